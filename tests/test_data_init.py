"""wnorm.data_init (paper sec. 3): after it, every initialized layer's pre-activations on the
init batch have per-unit mean 0 and standard deviation init_scale; g and b are the paper's
formulas on t = v.x/||v||; a failure leaves the model exactly as it was."""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wnorm
from wnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, WnormError
from wnorm.data_init import NO_BIAS_NOTE

D = torch.float64
TOL = 1e-4


# --------------------------------------------------------------------------- helpers
def unit_stats(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and population std over every axis but ``axis`` (float64, independent)."""
    t = y.double().movedim(axis, 0).reshape(y.shape[axis], -1)
    mu = t.sum(1) / t.shape[1]
    return mu, ((t - mu[:, None]) ** 2).sum(1).div(t.shape[1]).sqrt()


def unit_axis(module: nn.Module, y: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1 if y.dim() == module.weight.dim() else 0
    return y.dim() - 1


def first_outputs(model: nn.Module, modules: dict[str, nn.Module],
                  batch) -> dict[str, torch.Tensor]:
    """Each module's output at its first call, from a fresh no-grad pass."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in modules.items():
        def hook(mod, args, out, name=name):
            seen.setdefault(name, out.detach().clone())
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_standardized(model: nn.Module, report, batch, scale: float = 1.0,
                        tol: float = TOL) -> None:
    """Every initialized layer's output at its first call has std ``scale`` per unit and, where
    it has a bias, mean 0 (measured on a copy: a train-mode pass moves running statistics)."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    layers = {r.name: mods[r.name] for r in report.initialized}
    assert layers, "nothing was initialized"
    outs = first_outputs(model, layers, batch)
    assert set(outs) == set(layers)
    for r in report.initialized:
        y = outs[r.name]
        mu, sd = unit_stats(y, unit_axis(layers[r.name], y))
        assert (sd - scale).abs().max() < tol * scale, (r.name, sd)
        if NO_BIAS_NOTE not in r.note:
            assert mu.abs().max() < tol * scale, (r.name, mu)


def same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict:
    return copy.deepcopy(model.state_dict())


def assert_refused(model: nn.Module, batch: Any, match: str, **kwargs: Any) -> None:
    """``data_init(model, batch, **kwargs)`` raises a WnormError matching ``match`` and leaves
    the state dict bitwise as it was."""
    sd = snapshot(model)
    with pytest.raises(WnormError, match=match):
        wnorm.data_init(model, batch, **kwargs)
    assert same_state(model.state_dict(), sd)


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    """A residual block: the branch has two convs and is added to the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.branch(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.block = Block(6)
        self.shared = nn.Conv2d(6, 6, 1)  # called twice per forward
        self.down = nn.Sequential(nn.Sequential(nn.Conv2d(6, 5, 3, stride=2), nn.ReLU()))
        self.up = nn.ConvTranspose2d(5, 4, 2, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.up(self.down(x)))
        return self.head(x.mean((2, 3)))


FORWARD_ORDER = ["stem.0", "block.branch.0", "block.branch.2", "shared", "down.0.0", "up", "head"]


class Zoo(nn.Module):
    """Every layout of units: axis 1 with and without positions, the last axis (a Linear on a
    sequence), axis 0 (an unbatched conv), and a ConvTranspose (v's units on axis 1)."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, bias=bias)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1, bias=bias)
        self.t2 = nn.ConvTranspose2d(5, 3, 2, stride=2, bias=bias)
        self.c3 = nn.Conv3d(3, 2, 1, bias=bias)
        self.seq = nn.Linear(4, 6, bias=bias)
        self.lone = nn.Conv2d(2, 3, 2, bias=bias)
        self.head = nn.Linear(6, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))  # (N, 4, L)
        h2 = torch.tanh(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()))
        h3 = torch.tanh(self.t2(h2))  # (N, 3, 2L, 6)
        h3 = torch.tanh(self.c3(h3.unsqueeze(2)))  # (N, 2, 1, 2L, 6)
        s = torch.tanh(self.seq(h.transpose(1, 2)))  # (N, L, 6)
        u = self.lone(h3[0, :, 0])  # unbatched: (3, 2L-1, 5)
        return self.head(s).sum() + u.sum() + h3.sum()


class Seq3d(nn.Module):
    """Linears on a (N, L, C) input (units on the last axis), one without a bias, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4, bias=False)
        self.c = nn.Conv1d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)).transpose(1, 2))


# --------------------------------------------------------------------------- the property
@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_residual_convnet_standardized(init_scale):
    model = wnorm.apply(ResNet().to(D))
    x = torch.randn(32, 3, 6, 6, dtype=D)
    report = wnorm.data_init(model, x, init_scale=init_scale)
    assert [r.name for r in report] == FORWARD_ORDER
    assert all(r.status == "initialized" for r in report)
    assert_standardized(model, report, x, init_scale)
    # the report's mu/sigma are what set g and b: g = s/sigma, b = -mu g
    mods = dict(model.named_modules())
    for r in report:
        m = mods[r.name]
        assert r.mu.shape == r.sigma.shape == (m.weight_g.numel(),) and (r.sigma > 0).all()
        g = m.weight_g.detach().reshape(-1)
        torch.testing.assert_close(g, (init_scale / r.sigma).to(D), rtol=1e-6, atol=0)
        torch.testing.assert_close(m.bias.detach(), -r.mu.to(D) * g, rtol=1e-6, atol=1e-9)
    assert "block.branch.2" in str(report) and "initialized" in str(report)


def _reference_init(model: nn.Module, batch, init_scale: float) -> dict[str, tuple]:
    """The paper's init done by hand, layer by layer in forward order: for each layer, g = 1
    and b = 0, one pass to measure t = v.x/||v|| at its first call, then g = s/sigma[t],
    b = -mu[t] g. Returns {name: (mu, sigma)} and leaves ``model`` initialized."""
    layers = {n: m for n, m in model.named_modules() if wnorm.is_weight_normalized(m)}
    order = list(first_outputs(model, layers, batch))  # the order of the first calls
    expect = {}
    for name in order:
        m = layers[name]
        with torch.no_grad():
            m.weight_g.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        t = first_outputs(model, {name: m}, batch)[name]
        mu, sd = unit_stats(t, unit_axis(m, t))
        with torch.no_grad():
            m.weight_g.copy_((init_scale / sd).view(m.weight_g.shape))
            if m.bias is not None:
                m.bias.copy_(-mu * init_scale / sd)
        expect[name] = (mu, sd)
    return expect


def _unflatten_seq(bias: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Unflatten(1, (1, 6)),
                         nn.Conv1d(1, 3, 2, bias=bias), nn.Flatten(), nn.Linear(15, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("init_scale", [1.0, 0.5])
@pytest.mark.parametrize("make, shape", [
    (lambda: _unflatten_seq(True), (16, 5)),
    (lambda: _unflatten_seq(False), (16, 5)),
    (Seq3d, (7, 9, 5)),
    (lambda: Zoo(True), (6, 2, 5)),
    (lambda: Zoo(False), (6, 2, 5)),
], ids=["mlp-conv", "mlp-conv-no-bias", "sequence", "layouts", "layouts-no-bias"])
def test_g_b_and_report_follow_the_formulas_on_t(make, shape, init_scale, dtype):
    torch.manual_seed(0)
    model = wnorm.apply(make()).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    ref = copy.deepcopy(model)
    expect = _reference_init(ref, x, init_scale)
    report = wnorm.data_init(model, x, init_scale=init_scale)
    assert [r.name for r in report] == list(expect)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for r in report:
        mu, sd = expect[r.name]
        torch.testing.assert_close(r.mu.double(), mu, **tol)
        torch.testing.assert_close(r.sigma.double(), sd, **tol)
    mods, refs = dict(model.named_modules()), dict(ref.named_modules())
    for name in expect:
        torch.testing.assert_close(mods[name].weight_g, refs[name].weight_g, **tol)
        if mods[name].bias is not None:
            torch.testing.assert_close(mods[name].bias, refs[name].bias, **tol)
    assert_standardized(model, report, x, init_scale, tol=1e-9 if dtype == D else 1e-4)
    for r in report:  # a layer without a bias keeps its mean, and says so
        assert (NO_BIAS_NOTE in r.note) == (mods[r.name].bias is None)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.03), (torch.float16, 4e-3)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision_model_is_standardized_with_float32_statistics(dtype, tol, train):
    """A bfloat16/float16 model: statistics in float32 on the layer's own output, g stored as
    the rounded s/sigma[t]; the pre-activations are standardized to the dtype's precision."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), MeanOnlyBatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 16), nn.Tanh(), nn.Linear(16, 4))).to(dtype).train(train)
    x = (torch.randn(64, 3, 6, 6) * 3 + 1).to(dtype)
    # the reference in train mode: the BN subtracts the batch mean, as it does in the init
    expect = _reference_init(copy.deepcopy(model).train(), x, 0.5)
    report = wnorm.data_init(model, x, init_scale=0.5)
    assert [(r.name, r.status) for r in report] == [(n, "initialized") for n in ("0", "4", "6")]
    for r in report:
        g = dict(model.named_modules())[r.name].weight_g
        assert g.dtype == dtype and r.sigma.dtype == torch.float32
        # g is s/sigma[t] rounded once to the dtype (sigma measured independently in float64)
        expected_g = (0.5 / expect[r.name][1]).to(dtype).view(g.shape)
        torch.testing.assert_close(g, expected_g, rtol=torch.finfo(dtype).eps, atol=0)
    assert_standardized(model, report, x, 0.5, tol=tol)
    assert model(x).dtype == dtype


def test_channels_last_model_gets_the_same_init():
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 8, 8)
    report = wnorm.data_init(model, x)
    wnorm.data_init(twin, x.to(memory_format=torch.channels_last))
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert_standardized(twin, report, x.to(memory_format=torch.channels_last))


def test_include_plain_normal_parameterization():
    torch.manual_seed(0)
    model = ResNet().to(D)
    old = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in FORWARD_ORDER}
    x = torch.randn(32, 3, 6, 6, dtype=D)
    report = wnorm.data_init(model, x, init_scale=0.5, include_plain=True)
    assert [r.name for r in report] == FORWARD_ORDER
    assert not any(wnorm.is_weight_normalized(m) for m in model.modules())
    assert_standardized(model, report, x, 0.5)
    mods = dict(model.named_modules())
    for r in report:  # w rows scaled by s/sigma, bias -mu s/sigma
        m = mods[r.name]
        s = (0.5 / r.sigma).to(D)
        axis = 1 if isinstance(m, nn.ConvTranspose2d) else 0
        shape = [1] * m.weight.dim()
        shape[axis] = -1
        torch.testing.assert_close(m.weight.detach(), old[r.name] * s.view(shape), rtol=1e-6,
                                   atol=0)
        torch.testing.assert_close(m.bias.detach(), -r.mu.to(D) * s, rtol=1e-6, atol=1e-9)


def test_without_include_plain_plain_layers_untouched():
    model = ResNet().to(D)
    wnorm.apply(model, exclude=["head"])
    head = copy.deepcopy(model.head.state_dict())
    report = wnorm.data_init(model, torch.randn(16, 3, 6, 6, dtype=D))
    assert "head" not in [r.name for r in report]
    assert same_state(model.head.state_dict(), head)


@pytest.mark.parametrize("include_plain", [False, True], ids=["wn", "plain"])
def test_layer_without_bias_is_initialized_with_a_note(include_plain):
    """No bias to take the mean away: the layer is initialized (its spread is init_scale), and
    its report entry says the mean stays."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    if not include_plain:
        wnorm.apply(net)
    x = torch.randn(256, 5) + 2
    report = wnorm.data_init(net, x, include_plain=include_plain)
    assert [(r.name, r.status, r.reason, r.note) for r in report] == [
        ("0", "initialized", "", NO_BIAS_NOTE), ("2", "initialized", "", "")]
    assert "initialized (no bias: mean not removed)" in str(report)
    y = first_outputs(net, {"0": net[0]}, x)["0"]
    mu, sd = unit_stats(y, 1)
    assert mu.abs().min() > 0.1 and (sd - 1).abs().max() < TOL  # the mean stayed
    assert_standardized(net, report, x)


# --------------------------------------------------------------------------- skipped layers
class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.unused = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(torch.tanh(self.inp(x)))[0])


def test_lstm_skipped_and_unreached_reported_with_warning():
    model = wnorm.apply(WithLSTM().to(D))
    x = torch.randn(8, 5, 3, dtype=D)
    with pytest.warns(UserWarning, match=r"rnn \(recurrent layer.*unused \(not reached"):
        report = wnorm.data_init(model, x)
    by_name = {r.name: r for r in report}
    assert set(by_name) == {"inp", "rnn", "unused", "out"}
    assert by_name["rnn"].status == "skipped" and "recurrent" in by_name["rnn"].reason
    assert by_name["rnn"].mu is None and by_name["rnn"].sigma is None
    assert by_name["unused"].status == "skipped" and "not reached" in by_name["unused"].reason
    assert [r.name for r in report.initialized] == ["inp", "out"]
    # Linear on (N, T, F): units along the last axis, stats over batch and time
    assert_standardized(model, report, x)


def test_a_frozen_layer_is_left_as_it_is_and_the_next_initialized_on_its_output():
    # a frozen pretrained backbone under a new head: data_init used to overwrite its g and bias
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    model[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    x = torch.randn(64, 4) * 5 + 3
    with pytest.warns(UserWarning, match=r"0 \(frozen \(g/bias with requires_grad=False\)"):
        report = wnorm.data_init(model, x)
    assert [r.name for r in report.initialized] == ["2"]
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in frozen.items())
    with torch.no_grad():
        t = model(x)
    torch.testing.assert_close(t.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_a_parametrized_bias_is_reported_as_such_not_as_no_bias():
    import torch.nn.utils.parametrize as P

    class Positive(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b.exp()

    layer = wnorm.weight_norm(nn.Linear(6, 3))
    P.register_parametrization(layer, "bias", Positive())
    (r,) = wnorm.data_init(layer, torch.randn(64, 6) + 2)
    assert r.status == "initialized" and r.note == "bias parametrized: not set, mean not removed"


def test_the_skip_warning_raised_as_an_error_leaves_the_model_as_it_was():
    # under -W error the warning is an exception: the caller sees data_init fail, so the model
    # must not have been initialized behind it
    model = wnorm.apply(WithLSTM().to(D))
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="layers not initialized"):
            wnorm.data_init(model, torch.randn(8, 5, 3, dtype=D))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_unreached_layer_reported():
    model = WithLSTM()
    with pytest.warns(UserWarning, match=r"layers not initialized: unused \(not reached"):
        report = wnorm.data_init(model, torch.randn(8, 5, 3), include_plain=True)
    by_name = {r.name: r for r in report}
    assert by_name["unused"].status == "skipped" and "not reached" in by_name["unused"].reason
    assert "rnn" not in by_name  # a plain LSTM is no candidate


class _FastPath(nn.Linear):
    """A layer whose kernel refuses large batches, for a model that falls back on another."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 16:
            raise RuntimeError("fast kernel: batch too large")
        return super().forward(x)


class _Fallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fast, self.slow = nn.Linear(4, 6), _FastPath(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        try:
            return self.fast(h)
        except RuntimeError:
            return self.slow(h)


def test_a_layer_whose_forward_raised_inside_a_caught_error_is_left_as_it_was():
    # its pre hook had set g to 1 and the bias to 0; the report said "not reached", and the
    # layer kept g = 1 and b = 0
    torch.manual_seed(0)
    model = wnorm.apply(_Fallback())
    before = copy.deepcopy(model.fast.state_dict())
    x = torch.randn(64, 4)
    with pytest.warns(UserWarning, match=r"fast \(its forward raised an error that the model "
                                         r"caught"):
        report = wnorm.data_init(model, x)
    assert [r.name for r in report.initialized] == ["a", "slow"]
    assert same_state(model.fast.state_dict(), before)
    assert_standardized(model, report, x)


def test_dim_none_and_grouped_convT_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (4, 1)),
                          nn.ConvTranspose1d(4, 4, 1, groups=2))
    wnorm.weight_norm(model[0], dim=None)
    wnorm.weight_norm(model[2])
    sd = snapshot(model)
    with pytest.warns(UserWarning, match="not initialized"):
        report = wnorm.data_init(model, torch.randn(6, 3))
    reasons = {r.name: r.reason for r in report}
    assert "dim=None" in reasons["0"] and "groups" in reasons["2"]
    assert not report.initialized
    assert same_state(model.state_dict(), sd)


def test_include_plain_layer_it_cannot_set_is_reported_and_warned():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3, groups=2))
    w = net[1].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"layers not initialized: 1 \(ConvTranspose with "
                                         r"groups > 1"):
        report = wnorm.data_init(net, torch.randn(16, 4, 8, 8), include_plain=True)
    assert [(r.name, r.status) for r in report] == [("0", "initialized"), ("1", "skipped")]
    assert "groups > 1" in report[1].reason and report[1].mu is None
    assert torch.equal(net[1].weight, w)


@pytest.mark.parametrize("how, why", [
    ("spectral", r"computed by a parametrization \(_SpectralNorm\)"),
    ("parametrize_wn", r"computed by PyTorch's weight norm: call wnorm.apply\(model\) first"),
    ("old_wn", r"computed by PyTorch's weight norm: call wnorm.apply\(model\) first"),
])
def test_include_plain_reports_a_layer_whose_weight_is_computed(how, why):
    # include_plain asks for every Linear/Conv: one whose weight a parametrization computes was
    # neither initialized nor in the report nor in a warning
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    first = nn.Linear(4, 6)
    if how == "spectral":
        parametrizations.spectral_norm(first)
    elif how == "parametrize_wn":
        parametrizations.weight_norm(first)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
            torch.nn.utils.weight_norm(first)
    # eval: spectral norm's power iteration would change layer 0's output from pass to pass
    net = nn.Sequential(first, nn.ReLU(), nn.Linear(6, 3)).eval()
    before = {k: p.detach().clone() for k, p in first.named_parameters()}
    x = torch.randn(64, 4) * 3 + 2
    with pytest.warns(UserWarning, match=r"layers not initialized: 0 \(its 'weight' is " + why):
        report = wnorm.data_init(net, x, include_plain=True)
    assert {(r.name, r.status) for r in report} == {("0", "skipped"), ("2", "initialized")}
    assert all(torch.equal(p, before[k]) for k, p in first.named_parameters())
    assert_standardized(net, report, x)


# --------------------------------------------------------------------------- mean-only BN
def _mobn_batch_means(model, x) -> dict[str, torch.Tensor]:
    """Each mean-only BN's input batch mean at its first call (a fresh pass on a copy)."""
    model = copy.deepcopy(model)
    means = {}
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d)):
            def pre(mod, args, n=n):
                means.setdefault(n, args[0].detach().transpose(0, 1).flatten(1).mean(1))
            handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(x)
    return means


class OwnForwardBN(MeanOnlyBatchNorm1d):
    """A subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            m = x.mean([0, *range(2, x.dim())])
            self._track(m)
        else:
            m = self.running_mean
        return x + (self.bias - m).view(shape)


def _mobn_models():
    shared = nn.Linear(6, 6)
    return {
        "conv": lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3), MeanOnlyBatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
            nn.ReLU(), MeanOnlyBatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
            MeanOnlyBatchNorm1d(3)),
        "mlp-no-bias": lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6), nn.LeakyReLU(0.1),
            nn.Linear(6, 6, bias=False), MeanOnlyBatchNorm1d(6, momentum=None), nn.ReLU(),
            nn.Linear(6, 3)),
        "no-running-stats": lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6), nn.Tanh(),
            nn.Linear(6, 6), MeanOnlyBatchNorm1d(6, track_running_stats=False), nn.Tanh(),
            nn.Linear(6, 3)),
        "nested-shared": lambda: nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.Tanh()), shared, nn.Tanh(),
            nn.Sequential(shared, MeanOnlyBatchNorm1d(6), nn.Tanh()), nn.Linear(6, 3)),
        "own-forward-bn": lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False), OwnForwardBN(6), nn.Tanh(), nn.Linear(6, 3)),
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_mobn_models()))
def test_mean_only_bn_gets_the_batch_mean_and_later_layers_see_it(name, train):
    """The running mean of every mean-only BN is the batch mean of its input, and the layers
    after it are standardized on what the model computes with it, in train and eval mode (in
    eval, with the new running mean, not the one the pass started with)."""
    torch.manual_seed(0)
    model = wnorm.apply(_mobn_models()[name]().to(D)).train(train)
    x = torch.randn(48, 3, 6, 6, dtype=D) if name == "conv" else torch.randn(48, 5, dtype=D) + 1
    report = wnorm.data_init(model, x)
    assert report.initialized == list(report)
    means = _mobn_batch_means(model, x)
    assert means
    for n, m in model.named_modules():
        if n in means and m.track_running_stats:
            torch.testing.assert_close(m.running_mean, means[n], rtol=1e-9, atol=1e-12)
    if name == "conv":
        assert means["5"].min() > 0.1  # after a ReLU: a real, non-zero mean was taken
    assert_standardized(model, report, x)


def test_mean_only_bn_whose_bias_is_a_buffer():
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6),
                                      nn.Tanh(), nn.Linear(6, 3))).to(D)
    del model[1].bias
    model[1].register_buffer("bias", torch.full((6,), 0.5, dtype=D))  # a frozen bias
    x = torch.randn(32, 5, dtype=D) + 1
    report = wnorm.data_init(model, x)
    torch.testing.assert_close(model[1].running_mean, _mobn_batch_means(model, x)["1"])
    assert torch.equal(model[1].bias, torch.full((6,), 0.5, dtype=D))
    assert_standardized(model, report, x)


class SharedBN(nn.Module):
    """One mean-only BN called twice; its second input has another mean."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.bn = MeanOnlyBatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.l1(x)))
        return self.l3(self.bn(3 * torch.relu(self.l2(h))))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_shared_mean_only_bn_subtracts_what_its_forward_would_at_each_call(train):
    """The running mean is the first call's. A later call subtracts its own batch mean in
    training mode, as the layer's forward does (it subtracted the first call's, and the layer
    after it was left with a mean of up to 1 on the batch), and the running mean in eval."""
    torch.manual_seed(0)
    model = wnorm.apply(SharedBN()).to(D).train(train)
    x = torch.randn(64, 4, dtype=D)
    seen = []
    model.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()),
                                       prepend=True)
    model.l3.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()),
                                       prepend=True)
    report = wnorm.data_init(model, x)
    first, second, into_l3 = seen[:3]
    torch.testing.assert_close(model.bn.running_mean, first.mean(0))
    subtracted = second.mean(0) if train else first.mean(0)
    torch.testing.assert_close(into_l3, second - subtracted + model.bn.bias)
    assert_standardized(model, report, x)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_mean_only_bn_in_a_bfloat16_model(train):
    """A float32 BN in a bfloat16 model hands on bfloat16, as its forward does."""
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 8, bias=False), MeanOnlyBatchNorm1d(8),
                                    nn.ReLU(), nn.Linear(8, 2))).to(torch.bfloat16).train(train)
    net[1].float()
    x = torch.randn(64, 4, dtype=torch.bfloat16)
    report = wnorm.data_init(net, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    assert net[1].running_mean.dtype == torch.float32
    with torch.no_grad():
        assert net(x).dtype == torch.bfloat16
    assert_standardized(net, report, x, tol=0.03)


class TrackCounting(MeanOnlyBatchNorm1d):
    calls = 0

    def _track(self, mean: torch.Tensor) -> None:
        TrackCounting.calls += 1
        super()._track(mean)


def test_what_the_model_runs_is_never_bypassed():
    """The pass runs the model's own forward: an instance's replaced forward (as accelerate
    installs) and a BN subclass's _track run, and the layers are standardized on what the
    replaced forward feeds them."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4, bias=False), TrackCounting(4),
                                      nn.Tanh(), nn.Linear(4, 2))).train()
    orig = model.forward
    model.forward = lambda x: orig(x * 10 + 3)
    x = torch.randn(64, 3)
    TrackCounting.calls = 0
    wnorm.data_init(model, x)
    assert TrackCounting.calls == 1
    with torch.no_grad():
        h = model[0](x * 10 + 3)
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
    model.eval()  # the running mean is the init batch's: the same input to layer 3 as in init
    outs = first_outputs(model, {"0": model[0], "3": model[3]}, x)
    assert (unit_stats(outs["0"], 1)[1] - 1).abs().max() < TOL
    mu, sd = unit_stats(outs["3"], 1)
    assert mu.abs().max() < TOL and (sd - 1).abs().max() < TOL


@pytest.mark.parametrize("where", ["layer", "container"])
def test_a_user_hook_still_runs_and_hooks_are_removed(where):
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    seen = []
    target = model[0] if where == "layer" else model
    target.register_forward_hook(lambda m, a, y: seen.append(type(m).__name__))
    x = torch.randn(32, 5)
    report = wnorm.data_init(model, x)
    assert len(seen) == 1
    assert_standardized(model, report, x)
    assert len(model[0]._forward_hooks) == (1 if where == "layer" else 0)
    assert not model[0]._forward_pre_hooks and not model[2]._forward_hooks


# --------------------------------------------------------------------------- bad input
def test_empty_batch():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(WnormError, match=r"data_init: the batch is empty \(input 0 has shape "
                                         r"\(0, 3\)\)"):
        wnorm.data_init(model, torch.randn(0, 3))


class WithPrefix(nn.Module):
    """Two layers on ``cat([prefix, x])``: a prefix of no rows (none this batch) is valid."""

    def __init__(self, mean_only_bn: bool = False) -> None:
        super().__init__()
        self.bn = MeanOnlyBatchNorm1d(5) if mean_only_bn else nn.Identity()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.net(self.bn(torch.cat([prefix, x])))


class Shifted(WithPrefix):
    """The same layers on ``x + shift``: a shift of 5 values, whatever the batch."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.net(self.bn(x + shift))


def test_every_input_empty_is_an_empty_batch():
    model = wnorm.apply(WithPrefix())
    assert_refused(model, (torch.randn(0, 5), torch.empty(0, 5)),
                   r"^data_init: the batch is empty \(input 0 has shape \(0, 5\), input 1 has "
                   r"shape \(0, 5\)\)$")


def test_an_empty_side_input_is_not_an_empty_batch():
    # any input of 0 elements made the batch "empty": an empty prefix, mask or edge list
    torch.manual_seed(0)
    model = wnorm.apply(WithPrefix())
    batch = (torch.randn(64, 5) * 2 + 1, torch.empty(0, 5))
    report = wnorm.data_init(model, batch, init_scale=0.5)
    assert [(r.name, r.status) for r in report] == [("net.0", "initialized"),
                                                   ("net.2", "initialized")]
    assert_standardized(model, report, batch, scale=0.5)


@pytest.mark.parametrize("mean_only_bn", [False, True], ids=["layer", "mean-only-bn"])
def test_an_empty_input_beside_a_full_one_is_refused_where_it_arrives(mean_only_bn):
    # the batch is not called empty while one input has values: the first layer (or mean-only
    # batch norm) that gets nothing says so, by name
    model = wnorm.apply(Shifted(mean_only_bn))
    match = (r"^data_init: bn \(MeanOnlyBatchNorm1d\) got an empty batch \(0, 5\)"
             if mean_only_bn else r"^net\.0 \(Linear\): an empty batch reached it")
    assert_refused(model, (torch.randn(0, 5), torch.randn(5)), match)


def test_one_example_through_linear_has_sigma_zero():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    assert_refused(model, torch.randn(1, 3),
                   r"0 \(Linear\): the pre-activations of 4 of 4 units have sigma 0")


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_init_scale(scale):
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(WnormError, match=r"data_init: init_scale must be a positive finite "
                                         r"number; got"):
        wnorm.data_init(model, torch.randn(8, 3), init_scale=scale)


def test_init_scale_takes_numpy_numbers_and_0dim_tensors_not_bools():
    np = pytest.importorskip("numpy")
    x = torch.randn(32, 3)

    def g_after(scale):
        torch.manual_seed(0)
        model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
        wnorm.data_init(model, x, init_scale=scale)
        return model[0].weight_g.detach()

    ref = g_after(0.5)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).double()):
        assert torch.equal(g_after(s), ref), s
    assert torch.equal(g_after(np.int64(2)), g_after(2)) and torch.equal(
        g_after(torch.tensor(2)), g_after(2.0))
    assert not torch.equal(g_after(2.0), ref)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    for bad in (True, False, np.bool_(True), torch.tensor(True), torch.tensor([0.5]),
                torch.tensor(-1.0), np.float32("nan"), 10 ** 400, 1 + 0j):
        with pytest.raises(WnormError, match=r"data_init: init_scale must be a positive finite "
                                             r"number; got"):
            wnorm.data_init(model, x, init_scale=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch(bad):
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(8, 3)
    x[2, 1] = bad
    assert_refused(model, x, r"data_init: input 0 of the batch has NaN or inf")


class Explode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise ValueError("a NaN reached me")
        return x


def test_a_forward_failing_on_a_nan_input_blames_the_input():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), Explode()))
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    assert_refused(model, x, r"input 0 of the batch has NaN")


class Shrink(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-30


def test_finite_inputs_whose_sum_overflows_are_fine():
    """The input check sums the batch; a sum that overflows float32 is rechecked exactly."""
    model = wnorm.apply(nn.Sequential(Shrink(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x = torch.rand(64, 3) * 3e38
    assert torch.isinf(x.sum()) and torch.isfinite(x).all()
    report = wnorm.data_init(model, x)
    assert len(report.initialized) == 2
    assert_standardized(model, report, x)


def test_process_group_without_torch_distributed_is_an_error():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(WnormError, match=r"process_group=.* torch\.distributed is not "
                                         r"initialized"):
        wnorm.data_init(model, torch.randn(8, 3), process_group=object())


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def test_failure_midway_leaves_state_dict_bitwise_unchanged():
    """Layer 0 and the mean-only BN get initialized, then layer 3 sees a constant input."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4), Zero(),
                                      nn.Linear(4, 2))).train()
    params = dict(model.named_parameters())
    x = torch.randn(8, 3)
    assert_refused(model, x, r"^3 \(Linear\): every one of its 2 units has the same "
                   r"pre-activation for the whole init batch \(8 values per unit, sigma 0\), so "
                   r"its input, computed by the model, does not vary on the batch")
    assert all(p is params[k] for k, p in model.named_parameters())  # the same Parameters
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # hooks removed
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


class _TwoInputs(nn.Module):
    """``a`` reads batch input 0, ``b`` batch input 1 directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 8)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(c)


def test_constant_units_are_blamed_on_what_feeds_the_layer_only_when_that_is_the_cause():
    """The 'input computed by the model does not vary' message only for such an input: a
    constant batch input the layer reads itself, or a zero weight row of a plain layer, gets
    the message about the batch and the weight."""
    generic = "the pre-activations of 8 of 8 units have sigma 0 or non-finite statistics"
    assert_refused(wnorm.apply(_TwoInputs()), (torch.randn(32, 4), torch.zeros(32, 3)),
                   r"^b \(Linear\): " + generic)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    nn.init.zeros_(net[2].weight)  # a zero-initialized head, initialized as a plain layer
    assert_refused(net, torch.randn(32, 4), r"^2 \(Linear\): " + generic, include_plain=True)
    const = wnorm.apply(nn.Sequential(nn.Linear(4, 8), Zero(), nn.Linear(8, 8)))
    assert_refused(const, torch.randn(32, 4), r"^2 \(Linear\): every one of its 8 units")


class _FailsAfter(nn.Module):
    """A Linear, then an error, with a buffer that is a conjugate view."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("phase", torch.polar(torch.ones(4), torch.rand(4)).conj())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin(x)
        raise RuntimeError("the model's own error")


def test_a_buffer_that_is_a_conjugate_view_is_restored_with_the_rest():
    # the batched copy refuses tensors with the conj or neg bit: they are copied on their own
    model = wnorm.apply(_FailsAfter())
    sd = snapshot(model)
    with pytest.raises(RuntimeError, match="the model's own error"):
        wnorm.data_init(model, torch.randn(16, 4))
    assert same_state(model.state_dict(), sd)


class _Counter(nn.Module):
    """A module with its own buffer that its forward changes (as BatchNorm's running stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_failure_restores_every_buffer_the_pass_changed():
    """nn.BatchNorm's running statistics and any module's own buffers, changed by the pass's
    train-mode forward, are restored too."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _Counter(),
                                      MeanOnlyBatchNorm1d(4), Zero(), nn.Linear(4, 2))).train()
    assert_refused(model, torch.randn(8, 3) + 5,
                   r"5 \(Linear\): every one of its 2 units has the same pre-activation")


def test_zero_row_of_v_is_an_error_naming_the_layer():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with torch.no_grad():
        model[2].weight_v[1].zero_()
    assert_refused(model, torch.randn(16, 3),
                   r"^2 \(Linear\): the pre-activations of 1 of 2 units")


def test_a_norm_of_v_that_underflows_is_an_error():
    """||v||^2 below float32's range: the layer cannot compute its weight (it divides by
    ||v||), so the init refuses instead of writing g = 0."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with torch.no_grad():
        model[0].weight_v.mul_(1e-23 / model[0].weight_v.abs().max())
    assert_refused(model, torch.randn(64, 3), r"^0 \(Linear\): the pre-activations of 4 of 4")


def test_g_that_overflows_is_an_error_and_nothing_is_written():
    """sigma[t] is positive but s/sigma[t] overflows float32: an error, not an inf g."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(16, 3) * 1e-41  # subnormal inputs: sigma[t] ~ 1e-41
    assert_refused(model, x, r"^0 \(Linear\): the pre-activations of 4 of 4 units")


def _bias_free_then_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("scale, word", [(1e300, "large"), (1e39, "large"), (1e-320, "small")])
@pytest.mark.parametrize("make, dtype", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.float32),
    (_bias_free_then_linear, torch.float32),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.bfloat16),
], ids=["bias", "no-bias", "bfloat16"])
def test_init_scale_out_of_the_dtype_range_is_blamed_not_the_batch(scale, word, make, dtype):
    """sigma[t] is fine but g = init_scale/sigma[t] overflows or underflows the layer's dtype:
    the message blames init_scale, not the batch."""
    torch.manual_seed(0)
    model = wnorm.apply(make()).to(dtype)
    dt = str(dtype).replace(".", r"\.")
    s = re.escape(repr(scale))
    assert_refused(model, torch.randn(64, 3).to(dtype),
                   rf"^0 \(Linear\): init_scale={s} is too {word} for this layer's {dt}: "
                   r"g = init_scale/sigma\[t\] .*4 of 4 units .*init_scale 1 would fit",
                   init_scale=scale)


def test_g_that_overflows_float16_is_an_error_not_an_inf_g():
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4))).half()
    assert_refused(model, torch.randn(64, 3).half(),
                   r"^0 \(Linear\): init_scale=100000\.0 is too large for this layer's "
                   r"torch\.float16", init_scale=1e5)


def test_a_varying_batch_whose_g_overflows_float16_at_init_scale_1_is_not_blamed():
    # pre-activations near 1e-5 vary, but g = 1/sigma[t] ~ 1e5 is past float16's 65504 even
    # at init_scale 1: the message said the batch had sigma 0 and asked for one that varies
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(16, 32))).half()
    x = (torch.randn(64, 16) * 1e-5).half()
    with pytest.raises(WnormError, match=r"^0 \(Linear\): the batch varies \(sigma\[t\] in .* "
                       r"but g = init_scale/sigma\[t\] overflows this layer's torch\.float16 at "
                       r"init_scale=1\.0 .*; use init_scale up to ") as e:
        wnorm.data_init(model, x)
    top = float(re.search(r"init_scale up to (\S+),", str(e.value)).group(1))
    assert 0.1 < top < 1
    report = wnorm.data_init(model, x, init_scale=top)  # the bound it names fits
    assert [t.name for t in report.initialized] == ["0"]
    assert torch.isfinite(model[0].weight_g).all() and torch.isfinite(model(x)).all()


def test_bias_that_overflows_blames_init_scale():
    """g fits but b = -mu[t] g does not (a batch mean far from 0): init_scale is what to
    change, and the message says so."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(64, 3) + 1e3  # |mu[t]| ~ 1e3, sigma[t] ~ 1: g ~ 1e37 fits, b ~ 1e40 not
    assert_refused(model, x, r"^0 \(Linear\): init_scale=1e\+37 is too large for this "
                             r"layer's torch\.float32: the bias b = ", init_scale=1e37)


class KeepLarge(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x[:, 0] > 100]  # no example passes: an empty batch downstream


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_empty_batch_reaching_a_mean_only_bn_is_an_error(train):
    """Its running mean would be the mean of nothing (NaN): an error naming the layer, with
    the model unchanged."""
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), KeepLarge(),
                                      MeanOnlyBatchNorm1d(6))).train(train)
    assert_refused(model, torch.randn(32, 5),
                   r"^data_init: 3 \(MeanOnlyBatchNorm1d\) got an empty batch \(0, 6\)")


def test_an_empty_batch_reaching_a_layer_says_so():
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), KeepLarge(), nn.Linear(6, 2)))
    assert_refused(model, torch.randn(32, 5), r"^3 \(Linear\): an empty batch reached it")


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), MeanOnlyBatchNorm2d(5), nn.ReLU()),
    lambda: nn.Sequential(nn.Linear(3, 6, bias=False), MeanOnlyBatchNorm1d(7)),
], ids=["conv", "linear"])
def test_a_mean_only_bn_of_the_wrong_width_says_so(make):
    """A BN of the wrong width raises its own error, as model(x) does; model unchanged."""
    model = wnorm.apply(make())
    x = torch.randn(8, 3, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(8, 3)
    assert_refused(model, x, r"1 \(MeanOnlyBatchNorm[12]d\): expected [57] channels")


class Pair(nn.Module):
    """A layer whose forward returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


class TupleLinear(nn.Linear):
    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return super().forward(x), x.shape[0]


def test_a_layer_returning_a_tuple_is_an_error_not_a_silent_g_of_one():
    """Its g was set to 1 and its bias to 0 for the pass, and then it was reported 'not
    reached': the model kept g = 1."""
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 3)))
    model.append(TupleLinear(3, 2))
    wnorm.weight_norm(model[1])
    assert_refused(model, torch.randn(16, 5),
                   r"^1 \(TupleLinear\): its forward returned tuple; data_init standardizes")


def test_a_none_child_fails_as_the_forward_does():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    model[1] = None
    sd = snapshot(model)
    with pytest.raises(TypeError, match="NoneType"):
        model(torch.randn(4, 3))
    with pytest.raises(TypeError, match="NoneType"):
        wnorm.data_init(model, torch.randn(64, 3))
    assert same_state(model.state_dict(), sd)


# --------------------------------------------------------------------------- ties
class _TiedLMwn(nn.Module):
    """An embedding and an output layer sharing weight_g and weight_v."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = wnorm.weight_norm(nn.Embedding(10, 4))
        self.out = wnorm.weight_norm(nn.Linear(4, 10))
        self.out.weight_g, self.out.weight_v = self.emb.weight_g, self.emb.weight_v

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(i)))


class _TiedV(nn.Module):
    """Two layers sharing weight_v only, each with its own g: no tensor data_init sets is shared."""

    def __init__(self) -> None:
        super().__init__()
        self.a = wnorm.weight_norm(nn.Linear(5, 5))
        self.b = wnorm.weight_norm(nn.Linear(5, 5))
        self.b.weight_v = self.a.weight_v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_layer_sharing_g_with_a_layer_left_alone_is_skipped():
    """out's g is the embedding's g: setting it would rescale the embedding, so out's own
    input would change after its init."""
    torch.manual_seed(0)
    model = _TiedLMwn()
    sd = snapshot(model)
    with pytest.warns(UserWarning, match=r"out \(parameters shared with emb, which data_init "
                                         r"does not initialize\)"):
        report = wnorm.data_init(model, torch.randint(0, 10, (256,)))
    assert {r.name: r.status for r in report} == {"emb": "skipped", "out": "skipped"}
    assert same_state(model.state_dict(), sd)


@pytest.mark.parametrize("how", ["plain", "apply"])
def test_tied_targets_first_initialized_the_others_skipped(how):
    """Two targets sharing their weight (plain, include_plain) or their g and v (tied by
    wnorm.apply): the first is initialized and stays standardized, the second is skipped."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    seq[2].weight = seq[0].weight
    if how == "apply":
        wnorm.apply(seq)
        assert seq[0].weight_g is seq[2].weight_g
    x = torch.randn(256, 4) * 3
    with pytest.warns(UserWarning, match=r"2 \(parameters shared with 0, initialized first\)"):
        report = wnorm.data_init(seq, x, include_plain=how == "plain")
    assert [(r.name, r.status) for r in report] == [("0", "initialized"), ("2", "skipped")]
    assert_standardized(seq, report, x)


def test_shared_v_alone_is_no_tie_for_data_init():
    torch.manual_seed(0)
    model = _TiedV()
    x = torch.randn(256, 5)
    report = wnorm.data_init(model, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    assert_standardized(model, report, x)


# --------------------------------------------------------------------------- engines
def test_compiled_model_gets_the_same_init():
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].weight_g.mul_(4)  # g far from 1: a g * t output would be visible
    twin = copy.deepcopy(model)
    x = torch.randn(64, 5)
    report = wnorm.data_init(torch.compile(model, backend="eager"), x)
    wnorm.data_init(twin, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "mlp+meanonly"])
def test_data_init_under_inference_mode_equals_the_normal_pass(bn):
    def make():
        torch.manual_seed(0)
        norm = [MeanOnlyBatchNorm1d(6)] if bn else []
        return wnorm.apply(nn.Sequential(nn.Linear(5, 6, bias=not bn), *norm, nn.Tanh(),
                                         nn.Linear(6, 3)))
    model, twin = make(), make()
    x = torch.randn(32, 5)
    with torch.inference_mode():
        wnorm.data_init(model, x)
    wnorm.data_init(twin, x)
    assert not same_state(twin.state_dict(), make().state_dict())  # it did initialize
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def test_weight_after_init_is_g_v_over_norm_v_in_every_mode():
    """Nothing of the pass survives it: the weight is g v/||v|| with and without grad, cached
    or not, after a successful and after a failed init."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))).eval()
    broken = wnorm.apply(nn.Sequential(nn.Linear(5, 6), Zero(), nn.Linear(6, 3))).eval()
    with torch.no_grad(), wnorm.cached():
        model(torch.randn(4, 5))
    wnorm.data_init(model, torch.randn(32, 5))
    with pytest.raises(WnormError):
        wnorm.data_init(broken, torch.randn(32, 5))
    for m in (model[0], model[2], broken[0], broken[2]):
        expect = m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)
        with torch.no_grad(), wnorm.cached():
            torch.testing.assert_close(m.weight, expect)
        torch.testing.assert_close(m.weight, expect)


@pytest.mark.parametrize("saved", ["weight_g", "bias"])
def test_a_graph_that_saw_the_old_g_or_b_cannot_backpropagate(saved):
    """data_init writes g and b in place: autograd must see it (version counters), never hand
    out gradients computed from the values it overwrote."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(16, 3)
    with torch.no_grad():
        h = model(x)
    y = (h * getattr(model[2], saved).view(1, -1).pow(2)).sum()  # pow saves g (or b)
    wnorm.data_init(model, x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_model_with_nothing_to_initialize_is_an_error_not_a_no_op():
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(WnormError, match=r"data_init: Sequential has no weight-normalized layer "
                                         r".*wnorm.apply\(model\) first \(or pass include_plain"):
        wnorm.data_init(plain, torch.randn(8, 3))
    with pytest.raises(WnormError, match=r"nothing to initialize; call wnorm.apply\(model\) "
                                         r"first$"):
        wnorm.data_init(nn.Sequential(nn.ReLU()), torch.randn(8, 3), include_plain=True)


def test_a_write_into_the_weight_just_before_data_init_is_taken_then_standardized():
    # model.apply(init_fn) leaves the written weights held until their next access: they land
    # before the pass, not in it (where they undid g = 1 and every std came out scaled)
    model = wnorm.apply(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))).to(D)
    model.apply(lambda m: nn.init.normal_(m.weight, std=0.7) if isinstance(m, nn.Linear)
                else None)
    x = torch.randn(64, 6, dtype=D)
    report = wnorm.data_init(model, x)
    assert_standardized(model, report, x)


def test_a_failed_data_init_keeps_the_write_into_the_weight_made_before_it():
    model = wnorm.apply(nn.Sequential(nn.Linear(6, 4))).to(D)
    nn.init.normal_(model[0].weight, std=0.7)
    written = model[0].weight.detach().clone()
    with pytest.raises(WnormError):
        wnorm.data_init(model, torch.ones(8, 6, dtype=D))  # constant input: sigma 0
    torch.testing.assert_close(model[0].weight, written, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 23])
@pytest.mark.parametrize("fan_in", [5, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_constant_batch_is_refused_in_every_unit_not_given_a_huge_g(dtype, fan_in, seed):
    # every example the same: the rounded batch mean left a spread of about eps*|mu|, so most
    # units got sigma ~1e-7 and g ~1e7 on the CPU, and data_init passed when no unit happened
    # to round to exactly 0; and a GEMM may round equal rows a few ulps apart (float64 on an
    # AMD CPU gave 4 of 64 units a spread when only exactly equal values counted as constant;
    # seed 23 has a unit whose output cancels to 0.004, whose rounding its own |y| understated)
    torch.manual_seed(seed)
    model = wnorm.apply(nn.Sequential(nn.Linear(fan_in, 64), nn.ReLU(), nn.Linear(64, 3)))
    model = model.to(dtype)
    sd = snapshot(model)
    x = torch.randn(1, fan_in, dtype=dtype).expand(256, fan_in).contiguous()
    with pytest.raises(WnormError, match=r"^0 \(Linear\): the pre-activations of 64 of 64 units "
                                         r"have sigma 0"):
        wnorm.data_init(model, x)
    assert same_state(model.state_dict(), sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_units_with_a_small_real_spread_around_a_large_mean_are_initialized(dtype):
    # the guard against rounding noise must not take real variation for none: values 50 +- 1%
    # (in bfloat16, a few representable steps apart) are standardized like any others
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 8))).to(dtype)
    x = (50 + 0.5 * torch.randn(512, 4)).to(dtype)
    wnorm.data_init(model, x)
    assert bool((model[0].weight_g > 0).all() and (model[0].weight_g < math.inf).all())
    if dtype == torch.bfloat16:
        return  # w.x + b cancels in bfloat16: its outputs are too coarse to test the moments
    with torch.no_grad():
        y = model(x).float()
    torch.testing.assert_close(y.mean(0), torch.zeros(8), atol=0.05, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(8), atol=0.05, rtol=0)


def test_a_layer_fed_one_constant_by_the_model_is_blamed_on_what_feeds_it_whatever_the_mean():
    # the message for a computed constant input needs every unit seen as constant: with a
    # nonzero constant, the rounded mean made that a matter of chance
    class Const(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, 0.37)

    model = wnorm.apply(nn.Sequential(nn.Linear(4, 16), Const(), nn.Linear(16, 32))).float()
    with pytest.raises(WnormError, match=r"^2 \(Linear\): every one of its 32 units"):
        wnorm.data_init(model, torch.randn(300, 4))


def test_a_layer_called_with_a_keyword_input_is_blamed_on_what_feeds_it_too():
    # the pre-hook saw positional inputs only, so layer(input=h) read as fed nothing computed
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(input=self.a(x) * 0)

    with pytest.raises(WnormError, match=r"^b \(Linear\): every one of its 8 units"):
        wnorm.data_init(wnorm.apply(Keyword()), torch.randn(32, 4))


class _To(nn.Module):
    """Moves the activation to another device: a model split into pipeline stages."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_across_devices_is_initialized_as_on_one():
    # the pass's one check concatenated every layer's statistics on whichever device: a
    # RuntimeError for layers on the CPU and on the GPU
    torch.manual_seed(0)
    one = wnorm.apply(nn.Sequential(nn.Linear(8, 16), _To("cpu"), nn.ReLU(), nn.Linear(16, 4)))
    split = copy.deepcopy(one)
    split[0].cuda()
    split[1].device = "cpu"
    split[3].cpu()
    x = torch.randn(64, 8)
    wnorm.data_init(one, x)
    report = wnorm.data_init(split, x.cuda())
    assert [r.status for r in report] == ["initialized", "initialized"]
    for k, t in one.state_dict().items():
        torch.testing.assert_close(split.state_dict()[k].cpu(), t, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_a_model_on_the_meta_device_is_refused_naming_a_parameter():
    # deferred init (build on meta, apply, then to_empty): data_init before to_empty raised
    # "Tensor.item() cannot be called on meta tensors" or a device mismatch
    with torch.device("meta"):
        net = wnorm.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    for x in (torch.randn(16, 4), torch.randn(16, 4, device="meta")):
        with pytest.raises(WnormError, match=re.escape(
                "data_init: 0.bias is on the meta device (it has no values); materialize the "
                "model first: model.to_empty(device=...)")):
            wnorm.data_init(net, x)
    net.to_empty(device="cpu")
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    assert [r.status for r in wnorm.data_init(net, torch.randn(16, 4))] == ["initialized"] * 2


class ReadsItsChildsWeight(nn.Module):
    """Hands its projection's weight to a function itself, as WavLM's attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


class NormalizedParentReadsItsChildsWeight(ReadsItsChildsWeight):
    """The same, the parent holding a weight-normalized weight of its own (MultiheadAttention
    with its in_proj_weight normalized): its forward is wnorm's, inside which no read is held."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x @ self.scale)


@pytest.mark.parametrize("parent", ["plain", "normalized"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_layer_whose_weight_its_parent_reads_is_skipped_saying_so(train, parent):
    # it was said to be unreached, with advice to use eval mode, which reached it no better
    # (with a normalized parent, in both modes: no read is held inside a wnorm forward)
    if parent == "plain":
        model = wnorm.apply(ReadsItsChildsWeight()).train(train)
    else:
        model = wnorm.apply(wnorm.weight_norm(NormalizedParentReadsItsChildsWeight(), "scale"))
        model.train(train)
    with pytest.warns(UserWarning, match=r"proj \(its weight is read by the model outside the "
                                         r"layer's own forward"):
        report = wnorm.data_init(model, torch.randn(32, 4))
    assert [r.name for r in report.initialized] == ["head"]


class SharedBNLaterCallEmpty(nn.Module):
    """A head run on several selections, a later one empty (a level with no proposals)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(4, 4), MeanOnlyBatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head(self.bn(self.lin(x))), self.head(self.bn(self.lin(x[:0])))])


def test_a_shared_mean_only_bn_whose_later_call_is_empty_is_initialized():
    # the later call's own (empty) batch mean was asked for, and refused as an empty batch
    torch.manual_seed(0)
    model = wnorm.apply(SharedBNLaterCallEmpty()).train()
    x = torch.randn(16, 4)
    report = wnorm.data_init(model, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    torch.testing.assert_close(model.bn.running_mean, model.lin(x).mean(0).detach(),
                               rtol=1e-5, atol=1e-6)


def test_a_dataloader_an_iterator_a_numpy_array_or_a_string_flag_is_refused_naming_the_argument():
    # the commonest first mistakes gave PyTorch's TypeError naming nothing of data_init, and
    # include_plain="False" (truthy) rescaled the plain layers without a word
    net = wnorm.apply(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)))
    before = copy.deepcopy(net.state_dict())
    x, y = torch.randn(16, 5), torch.zeros(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    for batch, what in ((loader, "a DataLoader"), (iter([x]), "an iterator"),
                        (x.numpy(), "a NumPy array")):
        with pytest.raises(WnormError, match=rf"data_init: batch is {what}; pass one batch"):
            wnorm.data_init(net, batch)
    with pytest.raises(WnormError, match=r"a list batch is passed as 2 positional arguments, "
                                         r"model\(\*batch\): for a DataLoader's \(inputs, "
                                         r"targets\) pair, pass batch\[0\]"):
        wnorm.data_init(net, next(iter(loader)))
    with pytest.raises(WnormError, match=r"include_plain must be True or False; got 'False'"):
        wnorm.data_init(net, x, include_plain="False")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
