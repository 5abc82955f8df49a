"""wnorm.data_init (paper sec. 3): after it, every initialized layer's pre-activations on the
init batch have per-unit mean 0 and standard deviation init_scale."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
from torch import nn

import wnorm
from wnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, WnormError

D = torch.float64
TOL = 1e-4


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


def unit_stats(y: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and population std over the batch and every position (independent)."""
    axis = y.dim() - 1 if isinstance(module, nn.Linear) else 1
    t = y.movedim(axis, 0).reshape(y.shape[axis], -1)
    mu = t.sum(1) / t.shape[1]
    return mu, ((t - mu[:, None]) ** 2).sum(1).div(t.shape[1]).sqrt()


def first_outputs(model: nn.Module, modules: dict[str, nn.Module], batch) -> dict[str, torch.Tensor]:
    """Each module's output at its first call, from a fresh pass (hooks registered now)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in modules.items():
        def hook(mod, args, out, name=name):
            seen.setdefault(name, out.detach().clone())
        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return seen


def assert_standardized(outs, modules, scale):
    for name, y in outs.items():
        mu, sd = unit_stats(y, modules[name])
        assert mu.abs().max() < TOL * scale, (name, mu)
        assert (sd - scale).abs().max() < TOL * scale, (name, sd)


@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_residual_convnet_standardized(init_scale):
    model = wnorm.apply(ResNet().to(D))
    x = torch.randn(32, 3, 6, 6, dtype=D)
    report = wnorm.data_init(model, x, init_scale=init_scale)
    assert [r.name for r in report] == FORWARD_ORDER
    assert all(r.status == "initialized" for r in report)
    mods = dict(model.named_modules())
    layers = {n: mods[n] for n in FORWARD_ORDER}
    assert_standardized(first_outputs(model, layers, x), layers, init_scale)
    # the report's mu/sigma are what set g and b: g = s/sigma, b = -mu g
    for r in report:
        m = mods[r.name]
        assert r.mu.shape == r.sigma.shape == (m.weight_g.numel(),) and (r.sigma > 0).all()
        g = m.weight_g.detach().reshape(-1)
        torch.testing.assert_close(g, (init_scale / r.sigma).to(D), rtol=1e-6, atol=0)
        torch.testing.assert_close(m.bias.detach(), -r.mu.to(D) * g, rtol=1e-6, atol=1e-9)
    assert "block.branch.2" in str(report) and "initialized" in str(report)


def test_include_plain_normal_parameterization():
    torch.manual_seed(0)
    model = ResNet().to(D)
    old = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in FORWARD_ORDER}
    x = torch.randn(32, 3, 6, 6, dtype=D)
    report = wnorm.data_init(model, x, init_scale=0.5, include_plain=True)
    assert [r.name for r in report] == FORWARD_ORDER
    assert not any(wnorm.is_weight_normalized(m) for m in model.modules())
    mods = dict(model.named_modules())
    layers = {n: mods[n] for n in FORWARD_ORDER}
    assert_standardized(first_outputs(model, layers, x), layers, 0.5)
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
    assert all(torch.equal(v, head[k]) for k, v in model.head.state_dict().items())


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
    layers = {"inp": model.inp, "out": model.out}
    assert_standardized(first_outputs(model, layers, x), layers, 1.0)


def test_plain_unreached_layer_reported():
    model = WithLSTM()
    with pytest.warns(UserWarning, match=r"layers not initialized: unused \(not reached"):
        report = wnorm.data_init(model, torch.randn(8, 5, 3), include_plain=True)
    by_name = {r.name: r for r in report}
    assert by_name["unused"].status == "skipped" and "not reached" in by_name["unused"].reason
    assert "rnn" not in by_name  # a plain LSTM is no candidate


def test_dim_none_and_grouped_convT_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (4, 1)),
                          nn.ConvTranspose1d(4, 4, 1, groups=2))
    wnorm.weight_norm(model[0], dim=None)
    wnorm.weight_norm(model[2])
    with pytest.warns(UserWarning, match="not initialized"):
        report = wnorm.data_init(model, torch.randn(6, 3))
    reasons = {r.name: r.reason for r in report}
    assert "dim=None" in reasons["0"] and "groups" in reasons["2"]
    assert not report.initialized


def _mobn_batch_means(model, x) -> dict[str, torch.Tensor]:
    means = {}
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d)):
            def pre(mod, args, n=n):
                means.setdefault(n, args[0].detach().transpose(0, 1).flatten(1).mean(1))
            handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return means


def _wn_mobn_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), MeanOnlyBatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3), nn.ReLU(), MeanOnlyBatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3), MeanOnlyBatchNorm1d(3)).to(D)


def test_mean_only_bn_with_wn_train_mode():
    model = wnorm.apply(_wn_mobn_net()).train()
    x = torch.randn(24, 3, 6, 6, dtype=D)
    report = wnorm.data_init(model, x)
    assert [r.name for r in report] == ["0", "3", "7"]
    running = {n: m.running_mean.clone() for n, m in model.named_modules()
               if isinstance(m, (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d))}
    means = _mobn_batch_means(copy.deepcopy(model), x)
    assert set(running) == set(means) == {"1", "5", "8"}
    for n in running:  # running_mean = the batch mean of the layer's input
        torch.testing.assert_close(running[n], means[n], rtol=1e-6, atol=1e-7)
    assert means["5"].min() > 0.1  # after a ReLU: a real, non-zero mean was taken
    layers = {n: model[int(n)] for n in ("0", "3", "7")}
    assert_standardized(first_outputs(copy.deepcopy(model), layers, x), layers, 1.0)


def test_mean_only_bn_with_wn_eval_mode():
    """In eval mode the layers after a mean-only BN must be initialized on the input they see
    with the new running mean (not the old one the init pass started with)."""
    model = wnorm.apply(_wn_mobn_net()).eval()
    x = torch.randn(24, 3, 6, 6, dtype=D)
    wnorm.data_init(model, x)
    means = _mobn_batch_means(model, x)
    for n in ("1", "5", "8"):
        torch.testing.assert_close(model[int(n)].running_mean, means[n], rtol=1e-6, atol=1e-7)
    layers = {n: model[int(n)] for n in ("0", "3", "7")}
    assert_standardized(first_outputs(model, layers, x), layers, 1.0)


# ---------------------------------------------------------------------------------- bad input
def test_empty_batch():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(WnormError, match=r"data_init: the batch is empty \(input 0 has shape "
                                         r"\(0, 3\)\)"):
        wnorm.data_init(model, torch.randn(0, 3))


def test_one_example_through_linear_has_sigma_zero():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(WnormError, match=r"0 \(Linear\): the pre-activations of 4 of 4 units "
                                         r"have sigma 0"):
        wnorm.data_init(model, torch.randn(1, 3))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_init_scale(scale):
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(WnormError, match=r"data_init: init_scale must be a positive finite "
                                         r"number; got"):
        wnorm.data_init(model, torch.randn(8, 3), init_scale=scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch(bad):
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(8, 3)
    x[2, 1] = bad
    with pytest.raises(WnormError, match=r"data_init: input 0 of the batch has NaN or inf"):
        wnorm.data_init(model, x)


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def test_failure_midway_leaves_state_dict_bitwise_unchanged():
    """Layer 0 and the mean-only BN get initialized, then layer 3 sees a constant input."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4), Zero(),
                                      nn.Linear(4, 2))).train()
    sd = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 3)
    with pytest.raises(WnormError, match=r"^3 \(Linear\): the pre-activations of 2 of 2 units "
                                         r"have sigma 0"):
        wnorm.data_init(model, x)
    after = model.state_dict()
    assert list(after) == list(sd)
    for k, v in sd.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # hooks removed
    with torch.no_grad():  # and the model still computes what it did
        model.eval()
        assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------- raw pass and batch-norm kernel
# data_init runs each weight-normalized layer with v itself as its weight (r = v.x, no weight
# recomputed) and, for a layer with a bias and units on axis 1, takes the statistics and the
# standardized output from batch norm's kernel in one call; other layers rescale r by 1/||v||
# and take the general path. Both must give what the paper's formulas give on t = v.x/||v||.
class Seq3d(nn.Module):
    """A Linear on a (N, L, C) input: units on the last axis, not axis 1 (general path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4, bias=False)  # no bias: general path
        self.c = nn.Conv1d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)).transpose(1, 2))


@pytest.fixture
def path():
    """data_init has one path; kept so that the tests below read as before."""
    return [0]


@pytest.mark.parametrize("init_scale", [1.0, 0.5])
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                           nn.Conv1d(1, 3, 2)), None),
    (lambda: Seq3d(), (7, 9, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Conv1d(1, 3, 2, bias=False),
                           nn.Flatten(), nn.Linear(15, 4)), (16, 5)),
], ids=["fast-path", "general-path", "fast-path-no-bias"])
def test_g_b_and_report_follow_the_formulas_on_t(make, shape, init_scale, path):
    torch.manual_seed(0)
    model = wnorm.apply(make()).double()
    if shape is None:  # the Conv1d sees the Tanh output as one channel
        model = nn.Sequential(*list(model)[:4], nn.Unflatten(1, (1, 4)), model[4])
        shape = (16, 5)
    elif isinstance(model, nn.Sequential):
        model = nn.Sequential(*list(model)[:2], nn.Unflatten(1, (1, 6)), *list(model)[2:])
    x = torch.randn(shape, dtype=D)
    layers = {n: m for n, m in model.named_modules() if wnorm.is_weight_normalized(m)}
    # independent: each layer's t = v.x/||v|| at its first call, layers before it already
    # standardized (the reference does the pass layer by layer with the paper's formulas)
    ref = copy.deepcopy(model)
    ref_layers = {n: m for n, m in ref.named_modules() if n in layers}
    expect = {}
    for name, m in ref_layers.items():
        with torch.no_grad():
            m.weight_g.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        t = first_outputs(ref, {name: m}, x)[name]
        mu, sd = unit_stats(t, m)
        with torch.no_grad():
            m.weight_g.copy_((init_scale / sd).view(m.weight_g.shape))
            if m.bias is not None:
                m.bias.copy_(-mu * init_scale / sd)
        expect[name] = (mu, sd)
    report = wnorm.data_init(model, x, init_scale=init_scale)
    assert [r.name for r in report] == list(layers)
    assert path[0] in (0, len(layers))  # every layer took the kernel, or none did
    for r in report:
        mu, sd = expect[r.name]
        torch.testing.assert_close(r.mu, mu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r.sigma, sd, rtol=1e-9, atol=1e-12)
    for name, m in layers.items():
        torch.testing.assert_close(m.weight_g, ref_layers[name].weight_g, rtol=1e-9, atol=0)
        if m.bias is not None:
            torch.testing.assert_close(m.bias, ref_layers[name].bias, rtol=1e-9, atol=1e-12)
    outs = first_outputs(model, layers, x)
    for name, y in outs.items():  # a layer without a bias keeps its mean (scaled)
        mu, sd = unit_stats(y, layers[name])
        torch.testing.assert_close(sd, torch.full_like(sd, init_scale))
        if layers[name].bias is not None:
            assert mu.abs().max() < 1e-9


def test_weight_after_init_is_g_v_over_norm_v_in_every_mode():
    """The raw pass borrows the layer's weight cache; nothing of it may survive the init."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 5))  # fill the eval cache first
    wnorm.data_init(model, torch.randn(32, 5))
    for m in (model[0], model[2]):
        expect = m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)
        with torch.no_grad():  # eval + no_grad: the cached weight
            torch.testing.assert_close(m.weight, expect)
        torch.testing.assert_close(m.weight, expect)  # autograd's weight


def test_failed_init_leaves_no_raw_weight_behind():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), Zero(), nn.Linear(4, 2))).eval()
    with pytest.raises(WnormError, match=r"^2 \(Linear\)"):
        wnorm.data_init(model, torch.randn(8, 3))
    for m in (model[0], model[2]):
        with torch.no_grad():
            expect = m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)
            torch.testing.assert_close(m.weight, expect)


def test_zero_row_of_v_is_an_error_naming_the_layer(path):
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with torch.no_grad():
        model[2].weight_v[1].zero_()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(WnormError, match=r"^2 \(Linear\): the pre-activations of 1 of 2 units"):
        wnorm.data_init(model, torch.randn(16, 3))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ found in review, kept fixed
def test_compiled_model_gets_the_same_init():
    """A compiled forward computes the weight from g and v (never the raw cache), so the init
    must not rely on the raw pass there."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].weight_g.mul_(4)  # g far from 1: a g * t output would be visible
    twin = copy.deepcopy(model)
    x = torch.randn(64, 5)
    wnorm.data_init(torch.compile(model, backend="eager"), x)
    wnorm.data_init(twin, x)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class SharedBN(nn.Module):
    """One mean-only BN called twice; its second input has another mean."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.bn = MeanOnlyBatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.l1(x)))
        return self.l3(self.bn(3 * torch.relu(self.l2(h))))


def test_shared_mean_only_bn_keeps_its_first_call_mean_in_train_mode():
    """The init mean is the first call's; later calls subtract it too, as one process on the
    union of the ranks' batches does under torch.distributed."""
    torch.manual_seed(0)
    model = wnorm.apply(SharedBN()).to(D).train()
    x = torch.randn(64, 4, dtype=D)
    seen = []
    model.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()),
                                       prepend=True)
    model.l3.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()),
                                       prepend=True)
    wnorm.data_init(model, x)
    first, second, into_l3 = seen[:3]
    torch.testing.assert_close(model.bn.running_mean, first.mean(0))
    torch.testing.assert_close(into_l3, second - first.mean(0) + model.bn.bias)


# ------------------------------------------------------------------ the C++ kernel
class Zoo(nn.Module):
    """Every layout the kernel takes: units on axis 1 with and without positions, on the last
    axis (Linear on a sequence), on axis 0 (unbatched conv), and v's units on axis 1 (ConvT)."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, bias=bias)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1, bias=bias)
        self.t2 = nn.ConvTranspose2d(5, 3, 2, stride=2, bias=bias)
        self.c3 = nn.Conv3d(3, 2, 1, bias=bias)
        self.seq = nn.Linear(4, 6, bias=bias)
        self.lone = nn.Conv2d(2, 3, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))  # (N, 4, L)
        h2 = torch.tanh(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()))
        h3 = torch.tanh(self.t2(h2))  # (N, 3, 2L, 6)
        h3 = torch.tanh(self.c3(h3.unsqueeze(2)))  # (N, 2, 1, 2L, 6)
        s = torch.tanh(self.seq(h.transpose(1, 2)))  # (N, L, 6)
        u = self.lone(h3[0, :, 0])  # unbatched: (3, 2L-1, 5)
        return s.sum() + u.sum() + h3.sum()


def test_g_that_overflows_is_an_error_and_nothing_is_written(path):
    """sigma[t] is positive but s/sigma[t] overflows float32: an error, not an inf g."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    sd = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 3) * 1e-41  # subnormal inputs: sigma[t] ~ 1e-41
    with pytest.raises(WnormError, match=r"^0 \(Linear\): the pre-activations of 4 of 4 units"):
        wnorm.data_init(model, x)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("saved", ["weight_g", "bias"])
def test_a_graph_that_saw_the_old_g_or_b_cannot_backpropagate(path, saved):
    """data_init writes g and b in place: autograd must see it (version counters), never hand
    out gradients computed from the values it overwrote."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(16, 3)
    with torch.no_grad():
        h = model(x)
    y = (h * getattr(model[2], saved).view(1, -1).pow(2)).sum()  # pow saves g (or b)
    wnorm.data_init(model, x)
    assert path[0] in (0, 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ------------------------------------------------------------------ driven Sequentials
# A tree of plain Sequentials over leaf modules, none hooked, is run child by child by data_init
# itself (no hooks; a standard mean-only BN applied without its own reduction). It must do
# exactly what the hooked pass does.
@pytest.fixture
def hooked_only():
    """data_init has one (hooked) pass; kept so that the tests below read as before."""
    return lambda: None


class OwnForwardBN(MeanOnlyBatchNorm1d):
    """A subclass whose forward does not know the init protocol (_init_mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            m = x.mean([0, *range(2, x.dim())])
            self._track(m)
        else:
            m = self.running_mean
        return x + (self.bias - m).view(shape)


def _driven_models():
    shared = nn.Linear(6, 6)
    return {
        "mlp-meanonly": lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6), nn.LeakyReLU(0.1),
            nn.Linear(6, 6, bias=False), MeanOnlyBatchNorm1d(6, momentum=None), nn.ReLU(),
            nn.Linear(6, 3)),
        "mlp-meanonly-fused": lambda: wnorm.fuse_mean_only(nn.Sequential(
            nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6), nn.Tanh(),
            nn.Linear(6, 6), MeanOnlyBatchNorm1d(6, track_running_stats=False), nn.Tanh(),
            nn.Linear(6, 3))),
        "nested-shared": lambda: nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.Tanh()), shared, nn.Tanh(),
            nn.Sequential(shared, MeanOnlyBatchNorm1d(6), nn.Tanh()), nn.Linear(6, 3)),
        "conv": lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), MeanOnlyBatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)),
        "own-forward-bn": lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False), OwnForwardBN(6), nn.Tanh(), nn.Linear(6, 3)),
    }


DRIVEN = _driven_models()


@pytest.mark.parametrize("where", ["layer", "container"])
def test_a_user_hook_makes_the_pass_hooked_and_still_runs(where, monkeypatch):
    """A user hook on a layer or a container: data_init falls back to its own hooks (a driven
    pass would call around them), the user's hook sees the pass, the layers are standardized."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    seen = []
    (model[0] if where == "layer" else model).register_forward_hook(
        lambda m, a, y: seen.append(type(m).__name__))
    registered = []
    orig = nn.Module.register_forward_pre_hook

    def spy(self, *a, **k):
        registered.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", spy)
    x = torch.randn(32, 5)
    wnorm.data_init(model, x)
    assert registered == [model[0], model[2]] and len(seen) == 1
    monkeypatch.undo()
    layers = {"0": model[0], "2": model[2]}
    assert_standardized(first_outputs(model, layers, x), layers, 1.0)


# ------------------------------------------------------------------ found in review, kept fixed
@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "mlp+meanonly"])
def test_data_init_under_inference_mode_equals_the_normal_pass(bn, path):
    """Inference tensors have no version counter: the hand-on of a layer's known output mean
    to the next mean-only BN is skipped for them, not a crash."""
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
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def _replaced_forward(model: nn.Module) -> nn.Module:
    orig = model.forward
    model.forward = lambda x: orig(x * 10 + 3)  # an instance wrapper (as accelerate installs)
    return model


class TrackCounting(MeanOnlyBatchNorm1d):
    calls = 0

    def _track(self, mean: torch.Tensor) -> None:
        TrackCounting.calls += 1
        super()._track(mean)


@pytest.mark.parametrize("case", ["container-forward", "bn-forward", "bn-subclass-track"])
def test_what_a_forward_would_run_is_never_bypassed(case, hooked_only):
    """The driven pass may not run a Sequential or a mean-only BN differently from its call:
    an instance's own forward or a subclass's _track runs, and the init equals the hooked one."""
    def make():
        torch.manual_seed(0)
        cls = TrackCounting if case == "bn-subclass-track" else MeanOnlyBatchNorm1d
        model = wnorm.apply(nn.Sequential(nn.Linear(3, 4, bias=False), cls(4), nn.Tanh(),
                                          nn.Linear(4, 2)))
        if case == "container-forward":
            _replaced_forward(model)
        elif case == "bn-forward":
            _replaced_forward(model[1])
        return model
    model, twin = make(), make()
    x = torch.randn(64, 3)
    TrackCounting.calls = 0
    wnorm.data_init(model, x)
    driven_calls = TrackCounting.calls
    hooked_only()
    wnorm.data_init(twin, x)
    assert driven_calls == TrackCounting.calls - driven_calls  # as many as the hooked pass
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def test_a_none_child_fails_as_the_forward_does():
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    model[1] = None
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="NoneType"):
        model(torch.randn(4, 3))
    with pytest.raises(TypeError, match="NoneType"):
        wnorm.data_init(model, torch.randn(64, 3))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


class KeepLarge(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x[:, 0] > 100]  # no example passes: an empty batch downstream


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_empty_batch_reaching_a_mean_only_bn_is_an_error(train, hooked_only):
    """Its running mean would be the mean of nothing (NaN): an error naming the layer, in
    either pass, with the model unchanged."""
    for hooked in (False, True):
        if hooked:
            hooked_only()
        model = wnorm.apply(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), KeepLarge(),
                                          MeanOnlyBatchNorm1d(6))).train(train)
        sd = copy.deepcopy(model.state_dict())
        with pytest.raises(WnormError, match=r"^data_init: 3 \(MeanOnlyBatchNorm1d\) got an "
                                             r"empty batch \(0, 6\)"):
            wnorm.data_init(model, torch.randn(32, 5))
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_a_norm_of_v_that_underflows_is_an_error(path):
    """||v||^2 below float32's range: the layer could not compute its weight (it divides by
    ||v||), so the init refuses, on every path, instead of writing g = 0."""
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    with torch.no_grad():
        model[0].weight_v.mul_(1e-23 / model[0].weight_v.abs().max())
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(WnormError, match=r"^0 \(Linear\): the pre-activations of 4 of 4"):
        wnorm.data_init(model, torch.randn(64, 3))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), MeanOnlyBatchNorm2d(5), nn.ReLU()),
    lambda: nn.Sequential(nn.Linear(3, 6, bias=False), MeanOnlyBatchNorm1d(7)),
], ids=["conv", "linear"])
def test_a_mean_only_bn_of_the_wrong_width_says_so_in_every_pass(make, hooked_only):
    """After a bias-less layer (where the driven pass folds the BN into the layer's kernel
    call), a BN of the wrong width raises its own error, as model(x) does; model unchanged."""
    x = torch.randn(8, 3, 6, 6) if isinstance(make()[0], nn.Conv2d) else torch.randn(8, 3)
    for hooked in (False, True):
        if hooked:
            hooked_only()
        model = wnorm.apply(make())
        sd = copy.deepcopy(model.state_dict())
        with pytest.raises(WnormError, match=r"MeanOnlyBatchNorm[12]d: expected [57] channels"):
            wnorm.data_init(model, x)
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_a_mean_only_bn_whose_bias_is_a_buffer_is_initialized_as_in_the_hooked_pass(hooked_only):
    def make():
        torch.manual_seed(0)
        model = wnorm.apply(nn.Sequential(nn.Linear(5, 6, bias=False), MeanOnlyBatchNorm1d(6),
                                          nn.Tanh(), nn.Linear(6, 3)))
        del model[1].bias
        model[1].register_buffer("bias", torch.full((6,), 0.5))  # a frozen bias
        return model
    model, twin = make(), make()
    x = torch.randn(16, 5)
    wnorm.data_init(model, x)
    hooked_only()
    wnorm.data_init(twin, x)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


# ------------------------------------------------------------------ third review (rev. C)
@pytest.mark.parametrize("include_plain", [False, True], ids=["wn", "plain"])
def test_layer_without_bias_is_initialized_with_a_note(path, include_plain):
    """No bias to take the mean away: the layer is initialized (its spread is init_scale), and
    its report entry says the mean stays; it said nothing before."""
    from wnorm.data_init import NO_BIAS_NOTE

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    if not include_plain:
        wnorm.apply(net)
    x = torch.randn(256, 5) + 2
    report = wnorm.data_init(net, x, include_plain=include_plain)
    assert [(r.name, r.status, r.reason, r.note) for r in report] == [
        ("0", "initialized", "", NO_BIAS_NOTE), ("2", "initialized", "", "")]
    assert report.initialized == list(report)
    assert "initialized (no bias: mean not removed)" in str(report)
    y = first_outputs(net, {"0": net[0]}, x)["0"]
    mu, sd = unit_stats(y, net[0])
    assert mu.abs().min() > 0.1 and (sd - 1).abs().max() < TOL  # the mean stayed
    assert "mean" in wnorm.data_init.__doc__ and "bias" in wnorm.data_init.__doc__


def _bias_free_then_linear() -> nn.Module:
    """Layer 0 has no bias (PyTorch ops: the general path, never batch norm's kernel)."""
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))



@pytest.mark.parametrize("scale, word", [(1e300, "large"), (1e39, "large"), (1e-320, "small")])
@pytest.mark.parametrize("make, dtype", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.float32),
    (_bias_free_then_linear, torch.float32),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.bfloat16),
], ids=["bias", "no-bias", "bfloat16"])
def test_init_scale_out_of_the_dtype_range_is_blamed_not_the_batch(path, scale, word, make,
                                                                    dtype):
    """sigma[t] is fine but g = init_scale/sigma[t] overflows or underflows the layer's dtype:
    the error said 'sigma 0 ... needs a batch on which every unit varies'."""
    torch.manual_seed(0)
    model = wnorm.apply(make()).to(dtype)
    sd = copy.deepcopy(model.state_dict())
    dt = str(dtype).replace(".", r"\.")
    s = re.escape(repr(scale))
    with pytest.raises(WnormError, match=rf"^0 \(Linear\): init_scale={s} is too {word} for "
                                         rf"this layer's {dt}: g = init_scale/sigma\[t\] "
                                         r".*4 of 4 units .*init_scale 1 would fit"):
        wnorm.data_init(model, torch.randn(64, 3).to(dtype), init_scale=scale)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())



def test_g_that_overflows_float16_is_an_error_not_an_inf_g():
    """A float16 layer: g = 1e5/sigma[t] was computed in float32 and stored as inf in the
    float16 g, and the layer was reported 'initialized'."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4))).half()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(WnormError, match=r"^0 \(Linear\): init_scale=100000\.0 is too large for "
                                         r"this layer's torch\.float16"):
        wnorm.data_init(model, torch.randn(64, 3).half(), init_scale=1e5)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())



def test_bias_that_overflows_blames_init_scale(path):
    """g fits but b = -mu[t] g does not (a batch mean far from 0): init_scale is what to
    change, and the message says so."""
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    x = torch.randn(64, 3) + 1e3  # |mu[t]| ~ 1e3, sigma[t] ~ 1: g ~ 1e37 fits, b ~ 1e40 not
    with pytest.raises(WnormError, match=r"^0 \(Linear\): init_scale=1e\+37 is too large for this "
                                         r"layer's torch\.float32: the bias b = "):
        wnorm.data_init(model, x, init_scale=1e37)



def test_init_scale_takes_numpy_numbers_and_0dim_tensors_not_bools():
    """np.float32(0.5) and torch.tensor(0.5) were refused while np.float64 passed; True was
    taken as 1.0."""
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
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    for bad in (True, False, np.bool_(True), torch.tensor(True), torch.tensor([0.5]),
                torch.tensor(-1.0), np.float32("nan"), 10 ** 400, 1 + 0j):
        with pytest.raises(WnormError, match=r"data_init: init_scale must be a positive finite "
                                             r"number; got"):
            wnorm.data_init(model, x, init_scale=bad)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_mean_only_bn_in_a_bfloat16_model(train):
    """The init pass's own mean-only BN step returned float32 for a float32 BN in a bfloat16
    model, and the next bfloat16 layer failed."""
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 8, bias=False), MeanOnlyBatchNorm1d(8),
                                    nn.ReLU(), nn.Linear(8, 2))).to(torch.bfloat16).train(train)
    net[1].float()
    x = torch.randn(64, 4, dtype=torch.bfloat16)
    report = wnorm.data_init(net, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    with torch.no_grad():
        assert net(x).dtype == torch.bfloat16


class _Counter(nn.Module):
    """A module with its own buffer that its forward changes (as BatchNorm's running stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x



class _Wrap(nn.Module):
    """Not a Sequential: data_init uses hooks instead of running the children itself."""

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)



@pytest.mark.parametrize("wrap", [False, True], ids=["driven", "hooked"])
def test_failure_restores_every_buffer_the_pass_changed(wrap):
    """A failed init left nn.BatchNorm's running_mean, running_var and num_batches_tracked (and
    any module's own buffers) changed, though the docstring promises an unchanged model."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _Counter(), MeanOnlyBatchNorm1d(4),
                        Zero(), nn.Linear(4, 2))
    model = wnorm.apply(_Wrap(seq) if wrap else seq).train()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(WnormError, match=r"5 \(Linear\): the pre-activations of 2 of 2 units"):
        wnorm.data_init(model, torch.randn(8, 3) + 5)
    after = model.state_dict()
    changed = [k for k, v in sd.items() if not torch.equal(after[k], v)]
    assert changed == []



def test_include_plain_layer_it_cannot_set_is_reported_and_warned():
    """A plain grouped ConvTranspose under include_plain was left as it was with no report
    entry and no warning; a weight-normalized one was reported, with a warning."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3, groups=2))
    w = net[1].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"layers not initialized: 1 \(ConvTranspose with "
                                         r"groups > 1"):
        report = wnorm.data_init(net, torch.randn(16, 4, 8, 8), include_plain=True)
    assert [(r.name, r.status) for r in report] == [("0", "initialized"), ("1", "skipped")]
    assert "groups > 1" in report[1].reason and report[1].mu is None
    assert torch.equal(net[1].weight, w)


# ------------------------------------------------------------------ tied layers
class _TiedLMwn(nn.Module):
    """As tests/test_optim.py::_TiedLM: embedding and output layer share weight_g and weight_v."""

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
    """out's g is the embedding's g: setting it rescales the embedding, so out's own input
    changes and its pre-activations were not standardized, though reported 'initialized'."""
    torch.manual_seed(0)
    model = _TiedLMwn()
    sd = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"out \(parameters shared with emb, which data_init "
                                         r"does not initialize\)"):
        report = wnorm.data_init(model, torch.randint(0, 10, (256,)))
    assert {r.name: r.status for r in report} == {"emb": "skipped", "out": "skipped"}
    assert not report.initialized
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())



def _tied_seq() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model



@pytest.mark.parametrize("wrap", [False, True], ids=["driven", "hooked"])
@pytest.mark.parametrize("how", ["plain", "apply"])
def test_tied_targets_first_reached_initialized_the_others_skipped(path, wrap, how):
    """Two targets sharing their weight (plain, include_plain) or their g and v (tied by
    wnorm.apply): the second's init rescaled the first's weight after the fact, and both were
    reported 'initialized'. Now the first is initialized (and stays standardized), the second
    skipped with the reason and a warning."""
    torch.manual_seed(0)
    seq = _tied_seq()
    if how == "apply":
        wnorm.apply(seq)
        assert seq[0].weight_g is seq[2].weight_g
    model = _Wrap(seq) if wrap else seq
    x = torch.randn(256, 4) * 3
    pre = "seq." if wrap else ""
    with pytest.warns(UserWarning, match=rf"{pre}2 \(parameters shared with {pre}0, initialized "
                                         r"first\)"):
        report = wnorm.data_init(model, x, include_plain=how == "plain")
    assert [(r.name, r.status) for r in report] == [(pre + "0", "initialized"),
                                                    (pre + "2", "skipped")]
    outs = first_outputs(model, {"0": seq[0]}, x)
    assert_standardized(outs, {"0": seq[0]}, 1.0)



def test_shared_v_alone_is_no_tie_for_data_init():
    """g and b are what data_init sets; layers sharing only v are both initialized."""
    torch.manual_seed(0)
    model = _TiedV()
    x = torch.randn(256, 5)
    report = wnorm.data_init(model, x)
    assert [r.status for r in report] == ["initialized", "initialized"]
    layers = {"a": model.a, "b": model.b}
    assert_standardized(first_outputs(model, layers, x), layers, 1.0)
