r"""wnorm.fuse_mean_only: a layer + mean-only batch norm pair run as one layer with bias
:math:`b - \mu`, the mean from the layer applied to the batch sum.

Every property is checked against the unfused pair itself: a fused deep copy of a model must
give the same outputs, gradients (input, weight, layer bias, BN bias, g and v), running means
and batch counts as the original, in train and eval mode, float64 to ~1e-10 relative. A spy on
the fused path (``fused_pairs``) makes sure the shortcut actually ran where it should, and did
not where the plain calls must run (hooks, tracing, autocast, other ranks or dtypes), so that
"equal results" never passes just because nothing was fused.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as nn_module

import wnorm
import wnorm.mean_only_fused as mof
from wnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, WnormError
from wnorm.mean_only_bn import _MeanOnlyBatchNorm
from wnorm.mean_only_fused import _ConvMeanOnly

D = torch.float64
RTOL64 = 1e-10
RTOL32 = 1e-5


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors only: one intra-op thread is as fast, and gradcheck's thousands of small
    ops do not stall on a second thread when the shared CI cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fused_pairs(monkeypatch) -> Counter:
    """Counts, per forward, the pairs that took the fused path ("fused") and the real pairs
    that fell back to the plain calls ("plain"); neighbours that are no pair are not counted."""
    calls: Counter = Counter()
    real = mof._pair_forward

    def spy(layer: nn.Module, bn: nn.Module, kind: Any, x: Any, fusable: bool) -> Any:
        out = real(layer, bn, kind, x, fusable)
        calls["fused" if out is not None else "plain"] += 1  # called for real pairs only
        return out

    monkeypatch.setattr(mof, "_pair_forward", spy)

    class ActSpy(mof._ActConvMeanOnly):  # a pair fused together with the activation before it
        @classmethod
        def apply(cls, *args: Any) -> Any:
            calls["fused"] += 1
            calls["with activation"] += 1
            return super().apply(*args)

    monkeypatch.setattr(mof, "_ActConvMeanOnly", ActSpy)
    return calls


@pytest.fixture(params=["cpp-kernels", "torch-ops"])
def mean_path(request, monkeypatch) -> Counter:
    """Runs the test twice: with the convolution mean's small algebra (window sums, mean and
    their backward) in wnorm's C++ kernel, and in PyTorch ops. Counts the kernel's uses, so a
    test can check that the path it names really ran."""
    calls: Counter = Counter(path=request.param)
    if request.param == "torch-ops":
        monkeypatch.setattr(mof, "_mean_kernels", lambda xs, w: None)
        return calls
    real = mof._mean_kernels
    if real(torch.zeros(1, 1, dtype=D), torch.zeros(1, 1, dtype=D)) is None:
        pytest.skip("wnorm's C++ kernels are not available here")

    def spy(xs: torch.Tensor, w: torch.Tensor) -> Any:
        kern = real(xs, w)
        calls["kernel"] += kern is not None
        return kern

    monkeypatch.setattr(mof, "_mean_kernels", spy)
    return calls


@pytest.fixture(params=["centered", "function"])
def linear_path(request, monkeypatch) -> Counter:
    """Runs the test with a Linear pair at a small batch centering its input (the default up to
    ``_CENTER_MAX_BATCH``) and with the autograd Function that larger batches use; counts the
    calls of each."""
    calls: Counter = Counter(path=request.param)
    if request.param == "function":
        monkeypatch.setattr(mof, "_CENTER_MAX_BATCH", 0)
    centered, function = mof._centered_linear, mof._LinearMeanOnly

    def centered_spy(*args: Any) -> Any:
        calls["centered"] += 1
        return centered(*args)

    class FunctionSpy(function):
        @classmethod
        def apply(cls, *args: Any) -> Any:
            calls["function"] += 1
            return super().apply(*args)

    monkeypatch.setattr(mof, "_centered_linear", centered_spy)
    monkeypatch.setattr(mof, "_LinearMeanOnly", FunctionSpy)
    return calls


def perturb(model: nn.Module, scale: float = 0.5) -> nn.Module:
    """Move every parameter away from its init, so BN biases and layer biases are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the unfused model, a fused deep copy of it)."""
    return model, wnorm.fuse_mean_only(copy.deepcopy(model))


def batch(shape: tuple[int, ...], dtype: torch.dtype = D, offset: float = 0.7) -> torch.Tensor:
    """An input with a non-zero mean, so that batch and running means are non-trivial."""
    return 1.5 * torch.randn(shape, dtype=dtype) + offset


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float = 1.0) -> None:
    """Equal up to rounding: relative ``rtol``, absolute ``rtol`` times the values' scale."""
    scale = max(scale, 1.0, float(expected.detach().abs().max()) if expected.numel() else 0.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def weights_like(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed random tensor of ``y``'s shape (the same for both twins, no extra forward)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=gen, dtype=y.dtype)


def forward_backward(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Output and input gradient of ``sum(model(x) * r)``, r random but fixed by ``seed``
    (gradients accumulate on the parameters)."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * weights_like(y, seed)).sum().backward()
    return y.detach(), x.grad


def assert_same_state(ref: nn.Module, fz: nn.Module, rtol: float) -> None:
    """Parameters, their gradients and buffers (running_mean, num_batches_tracked) agree."""
    ref_p, fz_p = dict(ref.named_parameters()), dict(fz.named_parameters())
    assert list(ref_p) == list(fz_p)
    grads = [p.grad for p in ref_p.values() if p.grad is not None]
    gscale = max([float(g.abs().max()) for g in grads] + [1.0])
    for name, p in ref_p.items():
        q = fz_p[name]
        close(q.detach(), p.detach(), rtol)
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            close(q.grad, p.grad, rtol, gscale)
    ref_b, fz_b = dict(ref.named_buffers()), dict(fz.named_buffers())
    assert list(ref_b) == list(fz_b)
    for name, b in ref_b.items():
        if b.is_floating_point():
            close(fz_b[name], b, rtol)
        else:
            assert torch.equal(fz_b[name], b), name


def run_twins(ref: nn.Module, fz: nn.Module, shape: tuple[int, ...], train: bool,
              dtype: torch.dtype = D, rtol: float = RTOL64, steps: int = 3) -> int:
    """Train: ``steps`` forward/backward passes; eval: ``steps - 1`` no-grad train passes to
    accumulate running means, then one eval forward/backward. Compares everything after each
    pass; returns the number of forward passes made."""
    ref.train(), fz.train()
    calls = 0
    if not train:
        with torch.no_grad():
            for _ in range(steps - 1):
                x = batch(shape, dtype)
                close(fz(x), ref(x), rtol)
                calls += 1
        assert_same_state(ref, fz, rtol)
        ref.eval(), fz.eval()
        steps = 1
    for step in range(steps):
        x = batch(shape, dtype, offset=0.7 + step)
        y1, gx1 = forward_backward(ref, x, step)
        y2, gx2 = forward_backward(fz, x, step)
        close(y2, y1, rtol)
        close(gx2, gx1, rtol, float(gx1.abs().max()))
        assert_same_state(ref, fz, rtol)
        calls += 1
    return calls


# ------------------------------------------------------------------------- 1. the layer grid
IN, OUT = 4, 6
CONV_SHAPES = {  # layer class -> (mean-only BN class, input shape)
    nn.Conv1d: (MeanOnlyBatchNorm1d, (3, IN, 12)),
    nn.Conv2d: (MeanOnlyBatchNorm2d, (3, IN, 7, 8)),
    nn.Conv3d: (MeanOnlyBatchNorm3d, (2, IN, 5, 6, 5)),
    nn.ConvTranspose1d: (MeanOnlyBatchNorm1d, (3, IN, 6)),
    nn.ConvTranspose2d: (MeanOnlyBatchNorm2d, (3, IN, 4, 5)),
    nn.ConvTranspose3d: (MeanOnlyBatchNorm3d, (2, IN, 3, 3, 4)),
}
OPTIONS = {
    "default": {},
    "stride2": dict(stride=2),
    "padding1": dict(padding=1),
    "dilation2": dict(dilation=2),
    "groups2": dict(groups=2),
    "no_bias": dict(bias=False),
    "output_padding": dict(stride=2, output_padding=1),
    "all": dict(stride=2, padding=1, dilation=2, groups=2, bias=False),
}


def pair_net(cls: type[nn.Module], opts: dict[str, Any], bn_kwargs: dict[str, Any] | None = None,
             dtype: torch.dtype = D) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Sequential(layer, its mean-only BN, Tanh) with parameters moved off their init."""
    bn_kwargs = bn_kwargs or {}
    if cls is nn.Linear:
        layer: nn.Module = nn.Linear(5, OUT, **opts)
        bn_cls, shape = MeanOnlyBatchNorm1d, (7, 5)
    else:
        opts = dict(opts)
        transposed = issubclass(cls, nn.modules.conv._ConvTransposeNd)
        if transposed and opts.get("stride") == 2 and "output_padding" not in opts:
            opts["output_padding"] = 1  # the "all" case: both paddings
        layer = cls(IN, OUT, 3, **opts)
        bn_cls, shape = CONV_SHAPES[cls]
    net = nn.Sequential(layer, bn_cls(OUT, **bn_kwargs), nn.Tanh()).to(dtype)
    return perturb(net), shape


GRID = [(cls, name) for cls in CONV_SHAPES for name in OPTIONS
        if name != "output_padding" or issubclass(cls, nn.modules.conv._ConvTransposeNd)]
GRID += [(nn.Linear, "default"), (nn.Linear, "no_bias")]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, opt", GRID, ids=[f"{c.__name__}-{o}" for c, o in GRID])
def test_fused_equals_unfused_pair(cls, opt, train, fused_pairs, mean_path, linear_path):
    """Outputs, input gradient, every parameter gradient (layer weight and bias, BN bias),
    running_mean and num_batches_tracked equal the unfused pair's after several passes."""
    net, shape = pair_net(cls, OPTIONS[opt])
    ref, fz = twins(net)
    calls = run_twins(ref, fz, shape, train)
    assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == calls and fused_pairs["plain"] == 0
    kernel_layer = cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # eval: in the train passes before
    if cls is nn.Linear:
        other = "function" if linear_path["path"] == "centered" else "centered"
        assert linear_path[linear_path["path"]] > 0 and linear_path[other] == 0
    assert (mean_path["kernel"] > 0) == (kernel_layer and mean_path["path"] == "cpp-kernels")
    if train:
        assert int(fz[1].num_batches_tracked) == 3
        assert fz[1].running_mean.abs().max() > 1e-3  # the running mean really moved


BN_VARIANTS = {"momentum_none": dict(momentum=None),
               "no_running_stats": dict(track_running_stats=False)}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("cls", [nn.Linear, nn.Conv2d, nn.ConvTranspose1d])
def test_fused_equals_unfused_cumulative_and_untracked(cls, variant, train, fused_pairs,
                                                       linear_path):
    """momentum=None (cumulative average) and track_running_stats=False (batch means in eval)."""
    net, shape = pair_net(cls, {"stride": 2} if cls is not nn.Linear else {}, BN_VARIANTS[variant])
    ref, fz = twins(net)
    calls = run_twins(ref, fz, shape, train)
    assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == calls
    if variant == "momentum_none" and train:
        assert int(fz[1].num_batches_tracked) == 3
    if variant == "no_running_stats":
        assert fz[1].running_mean is None and fz[1].num_batches_tracked is None


def test_float32_matches_to_single_precision(fused_pairs, linear_path):
    """float32: three pairs (conv, transposed conv, linear) agree to single precision."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MeanOnlyBatchNorm2d(8), nn.ReLU(),
                        nn.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1),
                        MeanOnlyBatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 5),
                        MeanOnlyBatchNorm1d(5))
    ref, fz = twins(perturb(net))
    calls = run_twins(ref, fz, (6, 3, 6, 6), train=True, dtype=torch.float32, rtol=RTOL32)
    assert_same_state(ref, fz, RTOL32)
    assert fused_pairs["fused"] == 3 * calls
    calls += run_twins(ref, fz, (6, 3, 6, 6), train=False, dtype=torch.float32, rtol=RTOL32)
    assert_same_state(ref, fz, RTOL32)


def test_deeper_net_with_inplace_relu_and_channels_last(fused_pairs):
    """Several pairs in nested containers, an in-place ReLU on the fused output, a
    channels_last input and a loss whose gradient is an expanded tensor (y.sum())."""
    block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False),  # noqa: E731
                                       MeanOnlyBatchNorm2d(o), nn.ReLU(inplace=True))
    net = perturb(nn.Sequential(block(3, 4), block(4, 4), nn.Sequential(block(4, 2))).to(D))
    ref, fz = twins(net)
    x = batch((4, 3, 5, 5)).to(memory_format=torch.channels_last)
    outs = []
    for model in (ref, fz):
        xi = x.detach().clone().requires_grad_(True)
        y = model(xi)
        y.sum().backward()
        outs.append((y.detach(), xi.grad))
    close(outs[1][0], outs[0][0], RTOL64)
    close(outs[1][1], outs[0][1], RTOL64)
    assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == 3


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(transposed=st.booleans(), n=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       bias=st.booleans(), kernel=st.integers(1, 3), size=st.integers(3, 6),
       train=st.booleans(), seed=st.integers(0, 10_000))
def test_random_conv2d_configs(transposed, n, stride, padding, dilation, groups, bias, kernel,
                               size, train, seed, mean_path):
    """Random Conv2d / ConvTranspose2d geometries (batch of 1 included): fused equals unfused."""
    torch.manual_seed(seed)
    if transposed:
        out_pad = stride - 1 if stride > 1 else 0
        layer: nn.Module = nn.ConvTranspose2d(4, 6, kernel, stride, padding, out_pad, groups, bias,
                                              dilation)
    else:
        layer = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias)
    shape = (n, 4, size, size + 1)
    try:
        layer(torch.zeros(shape))
    except RuntimeError:  # output too small for this kernel: not a case
        return
    ref, fz = twins(perturb(nn.Sequential(layer, MeanOnlyBatchNorm2d(6)).to(D)))
    run_twins(ref, fz, shape, train, steps=2)
    assert_same_state(ref, fz, RTOL64)


@pytest.mark.parametrize("cls", [nn.Linear, nn.Conv2d])
@pytest.mark.parametrize("trainable", ["input_only", "weight_only", "bn_bias_only", "nothing"])
def test_partly_frozen_pairs(trainable, cls, fused_pairs, linear_path):
    """Frozen layers, a frozen BN bias, an input without gradient (the first layer of a net):
    the gradients that exist equal the unfused pair's, the others stay None."""
    net, shape = pair_net(cls, {})
    ref, fz = twins(net)
    wanted = {"weight_only": "0.weight", "bn_bias_only": "1.bias"}.get(trainable)
    for model in (ref, fz):
        for name, p in model.named_parameters():
            p.requires_grad_(name == wanted)
    x = batch(shape)
    outs = []
    for model in (ref, fz):
        xi = x.clone().requires_grad_(trainable == "input_only")
        y = model(xi)
        assert y.requires_grad == (trainable != "nothing")
        if y.requires_grad:
            (y * weights_like(y)).sum().backward()
        outs.append((y.detach(), xi.grad))
    close(outs[1][0], outs[0][0], RTOL64)
    assert (outs[1][1] is None) == (outs[0][1] is None) == (trainable != "input_only")
    if outs[0][1] is not None:
        close(outs[1][1], outs[0][1], RTOL64)
    assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == 1


def test_empty_batch_raises_the_bn_error_and_tracks_nothing(fused_pairs):
    ref, fz = twins(pair_net(nn.Conv2d, {})[0])
    for model in (ref, fz):
        with pytest.raises(WnormError, match=r"MeanOnlyBatchNorm2d: got an empty batch "
                                             r"\(0, 6, 5, 6\)"):
            model(torch.zeros((0,) + CONV_SHAPES[nn.Conv2d][1][1:], dtype=D))
        assert int(model[1].num_batches_tracked) == 0
        assert not model[1].running_mean.any()
    assert fused_pairs == Counter(plain=1)


@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "spectral_norm",
                                 "torch.nn.utils.weight_norm"])
def test_torch_weight_reparameterizations(how, fused_pairs):
    """torch's parametrizations (a weight property, forward unchanged) are fused; spectral
    norm's power iteration runs once per forward either way, so its buffers match too. The
    old torch.nn.utils.weight_norm recomputes the weight in a forward pre-hook: plain calls."""

    def build() -> nn.Sequential:  # built twice: the old API's weight cannot be deep-copied
        torch.manual_seed(3)
        net = pair_net(nn.Conv2d, {"padding": 1})[0]
        if how == "torch.nn.utils.weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.nn.utils.weight_norm(net[0])
        else:
            getattr(torch.nn.utils.parametrizations, how.rsplit(".", 1)[-1])(net[0])
        return net

    ref, fz = build(), wnorm.fuse_mean_only(build())
    calls = 0
    for train in (True, False):
        calls += run_twins(ref, fz, CONV_SHAPES[nn.Conv2d][1], train)
        assert_same_state(ref, fz, RTOL64)
    if how == "torch.nn.utils.weight_norm":
        assert fused_pairs == Counter(plain=calls)
    else:
        assert fused_pairs == Counter(fused=calls)


# ------------------------------------------------------------------------ 2. weight norm
def wn_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), MeanOnlyBatchNorm2d(4), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(4, 4, 3, stride=2, output_padding=1), MeanOnlyBatchNorm2d(4),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 6), MeanOnlyBatchNorm1d(6),
    ).to(D)
    return perturb(wnorm.apply(net))


WN_SHAPE = (5, 3, 4, 4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_weight_normalized_layers_g_and_v_grads(train, fused_pairs, linear_path):
    """With w = g v/||v|| through autograd, the gradients reach g and v as unfused."""
    ref, fz = twins(wn_net())
    calls = run_twins(ref, fz, WN_SHAPE, train)
    assert_same_state(ref, fz, RTOL64)
    names = [n for n, p in fz.named_parameters() if p.grad is not None]
    assert {"0.weight_g", "0.weight_v", "3.weight_g", "3.weight_v", "7.weight_g"} <= set(names)
    assert fused_pairs["fused"] == 3 * calls


def test_optimizer_side_weight_norm_adam_trains_the_same(fused_pairs, linear_path):
    """wnorm.optim.Adam (plain-weight forward/backward, g/v steps in the optimizer): a few
    steps of the fused and unfused twins land on the same parameters and running means."""
    ref, fz = twins(wn_net())
    # The biases of layers followed by mean-only BN get a train-mode gradient of exactly 0
    # fused and of rounding noise (~1e-16) unfused, which Adam turns into steps of
    # lr * noise / eps ~ 1e-10: compared separately, below.
    cancelled = {"0.bias", "3.bias", "7.bias"}
    start = {n: p.detach().clone() for n, p in fz.named_parameters() if n in cancelled}
    opts = [wnorm.optim.Adam(m, lr=1e-2) for m in (ref, fz)]
    assert opts[0].fused_layers() == opts[1].fused_layers()
    for step in range(4):
        x = batch(WN_SHAPE, offset=0.3 * step)
        for model, opt in zip((ref, fz), opts):
            opt.zero_grad()
            forward_backward(model, x)
            opt.step()
        for (name, p), q in zip(ref.named_parameters(), fz.parameters()):
            if name in cancelled:
                assert torch.equal(q.detach(), start[name]), name  # never moved
                close(p.detach(), start[name], 1e-7)
            else:
                close(q.detach(), p.detach(), 1e-9)
    for name, b in ref.named_buffers():
        close(dict(fz.named_buffers())[name].double(), b.double(), 1e-9)
    assert fused_pairs["fused"] == 3 * 4
    ref.eval(), fz.eval()
    x = batch(WN_SHAPE)
    with torch.no_grad():
        close(fz(x), ref(x), 1e-9)


# ------------------------------------------------------------ 3. the autograd Function itself
FUNCTION_CASES = {
    # name: (x shape, w shape, (stride, padding, dilation, transposed, output_padding, groups))
    "conv1d": ((3, 2, 5), (4, 2, 3), ([1], [1], [1], False, [0], 1)),
    "conv2d-stride-groups": ((2, 4, 5, 4), (6, 2, 3, 2),
                             ([2, 1], [1, 0], [1, 2], False, [0, 0], 2)),
    "convT1d-groups-outpad": ((3, 4, 4), (4, 2, 3), ([2], [1], [1], True, [1], 2)),
    "conv3d": ((2, 2, 3, 3, 3), (3, 2, 2, 2, 2), ([1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1)),
}


def function_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    xs, ws, args = FUNCTION_CASES[name]
    x = batch(xs).requires_grad_(True)
    w = torch.randn(ws, dtype=D, requires_grad=True)
    out = ws[1] * args[5] if args[3] else ws[0]
    shift = torch.randn(out, dtype=D, requires_grad=True)
    return x, w, shift, args


@pytest.mark.parametrize("name", list(FUNCTION_CASES))
def test_conv_mean_only_function_value_and_gradcheck(name, mean_path):
    """y = conv(x, w) - mean_batch[conv(x, w)] + shift; the mean output is that batch mean;
    the hand-written backward is the exact Jacobian (gradcheck, float64)."""
    x, w, shift, args = function_inputs(name)
    y, mean = _ConvMeanOnly.apply(x, w, shift, args)
    t = torch.ops.aten.convolution(x, w, None, *args)
    dims = [0] + list(range(2, t.dim()))
    bc = (1, -1) + (1,) * (t.dim() - 2)
    close(mean, t.mean(dims), RTOL64)
    close(y, t - t.mean(dims).view(bc) + shift.view(bc), RTOL64)
    assert not mean.requires_grad
    assert torch.autograd.gradcheck(lambda a, b, c: _ConvMeanOnly.apply(a, b, c, args)[0],
                                    (x, w, shift))
    assert (mean_path["kernel"] > 0) == (mean_path["path"] == "cpp-kernels" and not args[3])


KERNEL_GEOMETRIES = [
    # (batch-sum shape, weight shape, stride, padding, dilation, groups)
    ((3, 11), (5, 3, 3), [1], [1], [1], 1),
    ((4, 9), (6, 2, 2), [3], [2], [2], 2),
    ((3, 7, 8), (4, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1),
    ((4, 9, 6), (6, 2, 3, 2), [2, 1], [0, 2], [1, 2], 2),
    ((6, 5, 5), (6, 1, 1, 1), [2, 2], [0, 0], [1, 1], 6),  # depthwise 1x1
    ((2, 4, 5, 3), (3, 2, 2, 3, 2), [1, 2, 1], [1, 0, 1], [2, 1, 1], 1),
]


def kernel_or_skip() -> Any:
    kern = mof._mean_kernels(torch.zeros(1, 1, dtype=D), torch.zeros(1, 1, dtype=D))
    if kern is None:
        pytest.skip("wnorm's C++ kernels are not available here")
    return kern


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("geom", KERNEL_GEOMETRIES, ids=lambda g: f"{len(g[0]) - 1}d-{g[0]}")
def test_conv_mean_kernel_equals_the_convolution_it_stands_for(geom, dtype):
    """The C++ kernel against the definition, not against the Python path: its mean is the
    batch mean of conv(x, w); its backward is the exact gradient of -sum(gsum * mean) with
    respect to w (added to the given weight gradient in place, version bumped) and to every
    sample of x (the returned term)."""
    kern = kernel_or_skip()
    xs_shape, w_shape, stride, padding, dilation, groups = geom
    torch.manual_seed(0)
    x = torch.randn((3, *xs_shape), dtype=D, requires_grad=True)
    w = torch.randn(w_shape, dtype=D, requires_grad=True)
    args = (stride, padding, dilation, False, [0] * len(stride), groups)
    t = torch.convolution(x, w, None, *args)
    dims = [0, *range(2, t.dim())]
    count = t.numel() // t.shape[1]
    ctx = type("Ctx", (), {})()
    with torch.no_grad():
        mof._conv_mean(ctx, x, x.sum(0, keepdim=True), w, args)  # for the tap matrices
    taps = [r.to(dtype) for r in ctx.taps]
    mean, sums = kern.conv_mean_forward(x.detach().sum(0).to(dtype), w.detach().to(dtype), taps,
                                        groups, count)
    rtol = RTOL64 if dtype == D else RTOL32
    close(mean.double(), t.mean(dims).detach(), rtol)
    gsum = torch.randn(w_shape[0], dtype=D)
    (-(t.mean(dims) * gsum).sum()).backward()
    gw0 = torch.randn(w_shape, dtype=dtype)
    gw = gw0.clone()
    version = gw._version
    gxs = kern.conv_mean_backward(gsum.to(dtype), w.detach().to(dtype), sums, taps, groups,
                                  count, gw, True)
    assert gw._version > version
    close(gw.double() - gw0.double(), w.grad, rtol, float(w.grad.abs().max()))
    assert gxs.shape == xs_shape
    for n in range(x.shape[0]):  # the same term for every sample
        close(gxs.double(), x.grad[n], rtol, float(x.grad.abs().max()))
    assert kern.conv_mean_backward(gsum.to(dtype), w.detach().to(dtype), sums, taps, groups,
                                   count, None, False) is None


def test_conv_mean_kernel_refuses_what_does_not_fit():
    kern = kernel_or_skip()
    xs, w = torch.randn(3, 8, dtype=D), torch.randn(4, 3, 3, dtype=D)
    taps = [torch.ones(3, 8, dtype=D)]
    with pytest.raises(RuntimeError, match="does not fit 3 input channels, 2 groups"):
        kern.conv_mean_forward(xs, w, taps, 2, 24)
    with pytest.raises(RuntimeError, match="must be a contiguous CPU tensor of dtype Double"):
        kern.conv_mean_forward(xs.float(), w, taps, 1, 24)
    with pytest.raises(RuntimeError, match="does not fit tap matrix 0"):
        kern.conv_mean_forward(torch.randn(3, 9, dtype=D), w, taps, 1, 24)
    _, sums = kern.conv_mean_forward(xs, w, taps, 1, 24)
    with pytest.raises(RuntimeError, match="the weight gradient"):
        kern.conv_mean_backward(torch.randn(4, dtype=D), w, sums, taps, 1, 24,
                                torch.randn(4, 3, 2, dtype=D), True)


@pytest.mark.parametrize("wrt", ["x", "w", "shift"])
def test_conv_mean_only_gradgradcheck_per_input(wrt):
    """Second derivatives with respect to one input at a time are right."""
    x, w, shift, args = function_inputs("conv2d-stride-groups")
    inputs = {"x": x, "w": w, "shift": shift}

    def f(t: torch.Tensor) -> torch.Tensor:
        kw = {k: (t if k == wrt else v.detach()) for k, v in inputs.items()}
        return _ConvMeanOnly.apply(kw["x"], kw["w"], kw["shift"], args)[0]

    assert torch.autograd.gradgradcheck(f, (inputs[wrt],))


def test_conv_mean_only_gradgradcheck_joint():
    x, w, shift, args = function_inputs("conv1d")
    assert torch.autograd.gradgradcheck(lambda a, b, c: _ConvMeanOnly.apply(a, b, c, args)[0],
                                        (x, w, shift))


def double_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d/dx of ||dL/dw||^2 for the first layer's weight (a gradient-norm penalty)."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    loss = (y * weights_like(y)).sum()
    (gw,) = torch.autograd.grad(loss, model[0].weight, create_graph=True)
    (gx,) = torch.autograd.grad(gw.square().sum(), x)
    return gx


def test_double_backward_linear_pair_and_input_gradient_penalty(linear_path):
    """Second-order gradients that do work: a Linear pair (autograd's own graph) and, for a
    conv pair, the input-gradient penalty d||dL/dx||^2/dw (WGAN-GP style)."""
    ref, fz = twins(pair_net(nn.Linear, {})[0])
    x = batch((7, 5))
    close(double_backward(fz, x), double_backward(ref, x), RTOL64)

    ref, fz = twins(pair_net(nn.Conv1d, {"stride": 2})[0])
    x = batch((3, IN, 12))
    grads = []
    for model in (ref, fz):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (gx,) = torch.autograd.grad((y * weights_like(y)).sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), model[0].weight)[0])
    close(grads[1], grads[0], RTOL64)


def test_double_backward_conv_pair_weight_gradient_penalty():
    ref, fz = twins(pair_net(nn.Conv1d, {})[0])
    x = batch((3, IN, 12))
    close(double_backward(fz, x), double_backward(ref, x), RTOL64)


# --------------------------------------------------------------------------- 4. fallbacks
def conv_pair() -> tuple[nn.Sequential, nn.Sequential]:
    return twins(pair_net(nn.Conv2d, {"padding": 1})[0])


CONV_SHAPE = CONV_SHAPES[nn.Conv2d][1]
HOOKS = ["forward_pre", "forward", "full_backward", "full_backward_pre"]


def add_hook(module: nn.Module, kind: str, count: Counter, key: str) -> Any:
    def hook(*args: Any, **kwargs: Any) -> None:
        count[key] += 1

    return getattr(module, f"register_{kind}_hook")(hook)


@pytest.mark.parametrize("where", ["layer", "bn"])
@pytest.mark.parametrize("kind", HOOKS)
def test_module_hooks_run_and_pair_falls_back(kind, where, fused_pairs):
    ref, fz = conv_pair()
    count: Counter = Counter()
    idx = 0 if where == "layer" else 1
    handle = add_hook(fz[idx], kind, count, "fused")
    add_hook(ref[idx], kind, count, "ref")
    calls = run_twins(ref, fz, CONV_SHAPE, train=True)
    assert_same_state(ref, fz, RTOL64)
    assert count["fused"] == count["ref"] == calls  # one forward and one backward per pass
    assert fused_pairs == Counter(plain=calls)
    handle.remove()  # no hook left: the shortcut comes back
    fz(batch(CONV_SHAPE))
    assert fused_pairs == Counter(plain=calls, fused=1)


def test_forward_hook_that_changes_the_bn_output_is_honored(fused_pairs):
    ref, fz = conv_pair()
    x = batch(CONV_SHAPE)
    ref.eval(), fz.eval()
    with torch.no_grad():
        plain = ref(x)
    for m in (ref, fz):
        m[1].register_forward_hook(lambda mod, inp, out: 2 * out + 1)
    with torch.no_grad():
        hooked = fz(x)
        close(hooked, ref(x), RTOL64)
    assert (hooked - plain).abs().max() > 1e-2
    assert fused_pairs["fused"] == 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["layer", "bn"])
def test_a_forward_replaced_on_the_instance_is_honored(where, train, fused_pairs):
    """A wrapper installed as the instance's forward (accelerate's add_hook_to_module does
    this) runs, so the pair falls back to the plain calls."""
    ref, fz = conv_pair()
    idx = 0 if where == "layer" else 1
    for m in (ref, fz):
        orig = m[idx].forward
        m[idx].forward = lambda x, orig=orig: 2 * orig(x) + 1
    ref.train(train), fz.train(train)
    x = batch(CONV_SHAPE)
    with torch.no_grad():
        close(fz(x), ref(x), RTOL64)
    assert fused_pairs["fused"] == 0
    del fz[idx].forward  # the class's forward again: the shortcut comes back
    fz(x)
    assert fused_pairs["fused"] == 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_bn_whose_bias_is_a_buffer_gives_the_plain_calls_results(train):
    ref, fz = conv_pair()
    for m in (ref, fz):
        del m[1].bias
        m[1].register_buffer("bias", torch.full((m[1].num_features,), 0.5, dtype=torch.float64))
    ref.train(train), fz.train(train)
    x = batch(CONV_SHAPE)
    with torch.no_grad():
        close(fz(x), ref(x), RTOL64)
    assert_same_state(ref, fz, RTOL64)


@pytest.mark.parametrize("kind", HOOKS)
def test_global_module_hooks_see_every_call(kind, fused_pairs):
    ref, fz = conv_pair()
    seen: dict[str, Counter] = {"ref": Counter(), "fused": Counter()}
    current = ["ref"]

    def hook(module: nn.Module, *args: Any) -> None:
        seen[current[0]][module._get_name()] += 1

    handle = getattr(nn_module, f"register_module_{kind}_hook")(hook)
    try:
        for name, model in (("ref", ref), ("fused", fz)):
            current[0] = name
            x = batch(CONV_SHAPE).requires_grad_(True)
            model(x).sum().backward()
    finally:
        handle.remove()
    assert seen["fused"] == seen["ref"]
    assert seen["fused"]["Conv2d"] == seen["fused"]["MeanOnlyBatchNorm2d"] == 1
    assert fused_pairs["fused"] == 0


def test_jit_trace_records_the_plain_calls(fused_pairs):
    ref, fz = conv_pair()
    ref.eval(), fz.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fz, batch(CONV_SHAPE), check_trace=False)
    assert 'getattr(self, "1")' in traced.code  # the BN is called, not skipped
    assert fused_pairs["fused"] == 0
    x = batch(CONV_SHAPE, offset=-2.0)  # another batch: nothing was baked in
    with torch.no_grad():
        close(traced(x), ref(x), RTOL64)


def test_fx_symbolic_trace_records_the_plain_calls(fused_pairs):
    ref, fz = conv_pair()

    class Tracer(torch.fx.Tracer):  # mean-only BN's shape checks are not symbolically traceable
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _MeanOnlyBatchNorm) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(fz)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2"]
    gm = torch.fx.GraphModule(fz, graph)
    calls = run_twins(ref, gm, CONV_SHAPE, train=True)
    assert_same_state(ref, gm, RTOL64)
    assert fused_pairs["fused"] == 0 and calls == 3


def test_autocast_falls_back_to_the_plain_calls(fused_pairs):
    net = perturb(nn.Sequential(nn.Conv2d(IN, OUT, 3), MeanOnlyBatchNorm2d(OUT),
                                nn.Linear(6, 3)))  # float32 parameters
    ref, fz = twins(net)
    x = batch(CONV_SHAPE, torch.float32)
    outs = []
    for model in (ref, fz):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi)
        y.float().sum().backward()
        outs.append((y, xi.grad))
    assert outs[0][0].dtype == outs[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)  # the very same ops
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)
    assert_same_state(ref, fz, 0.0)
    assert fused_pairs["fused"] == 0


@pytest.mark.parametrize("case", ["unbatched-conv1d", "linear-3d-input"])
def test_input_of_another_rank_falls_back(case, fused_pairs):
    """Unbatched Conv1d input (C, L) and a 3-D Linear input: the BN then sees another layout,
    which the shortcut must not reinterpret."""
    if case == "unbatched-conv1d":  # (3, 6) -> (4, 4): BN1d sees N=4, C=4
        net, shape = nn.Sequential(nn.Conv1d(3, 4, 3), MeanOnlyBatchNorm1d(4)), (3, 6)
    else:  # (6, 4, 5) -> (6, 4, 4): BN1d sees C=4 (the sequence axis), L=4
        net, shape = nn.Sequential(nn.Linear(5, 4), MeanOnlyBatchNorm1d(4)), (6, 4, 5)
    ref, fz = twins(perturb(net.to(D)))
    for train in (True, False):
        run_twins(ref, fz, shape, train)
        assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == 0 and fused_pairs["plain"] > 0


def test_dtype_mismatch_falls_back(fused_pairs):
    """A float64 conv next to a float32 BN: the unfused pair's promotions, not the shortcut's."""
    net = perturb(nn.Sequential(nn.Conv2d(IN, OUT, 3).to(D), MeanOnlyBatchNorm2d(OUT)))
    ref, fz = twins(net)
    run_twins(ref, fz, CONV_SHAPE, train=True)
    assert_same_state(ref, fz, RTOL64)
    assert fz[1].running_mean.dtype == torch.float32
    assert fused_pairs["fused"] == 0
    x32 = batch(CONV_SHAPE, torch.float32)  # input dtype != weight dtype: the same error
    with pytest.raises(RuntimeError) as unfused_err:
        ref(x32)
    with pytest.raises(RuntimeError) as fused_err:
        fz(x32)
    assert str(fused_err.value) == str(unfused_err.value)


def test_lazy_layer_initializes_through_the_plain_call_then_fuses(fused_pairs):
    net = nn.Sequential(nn.LazyConv2d(OUT, 3), MeanOnlyBatchNorm2d(OUT)).to(D)
    wnorm.fuse_mean_only(net)
    torch.manual_seed(1)
    y = net(batch(CONV_SHAPE))  # the lazy init runs as a forward pre-hook: plain calls
    assert fused_pairs == Counter(plain=1) and type(net[0]) is nn.Conv2d
    ref = copy.deepcopy(net)
    wnorm.fuse_mean_only(ref, enabled=False)
    run_twins(ref, net, CONV_SHAPE, train=True)
    assert_same_state(ref, net, RTOL64)
    assert fused_pairs["fused"] == 3 and torch.isfinite(y).all()


def test_activation_checkpointing_and_functional_call(fused_pairs):
    ref, fz = twins(wn_net())
    x = batch(WN_SHAPE)
    grad_x = []
    for model in (ref, fz):
        xi = x.clone().requires_grad_(True)
        y = torch.utils.checkpoint.checkpoint(model, xi, use_reentrant=False)
        y.square().sum().backward()
        grad_x.append(xi.grad)
    close(grad_x[1], grad_x[0], RTOL64)
    assert_same_state(ref, fz, RTOL64)  # the recomputed forward counted the same
    params = {n: p.detach() + 0.1 for n, p in ref.named_parameters()}
    close(torch.func.functional_call(fz, params, (x,)),
          torch.func.functional_call(ref, params, (x,)), RTOL64)
    assert fused_pairs["fused"] > 0


def test_subclass_overriding_conv_forward_is_not_bypassed():
    class ScaledConv(nn.Conv2d):  # e.g. weight standardization or a custom padding
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, 2 * weight, bias)

    net = nn.Sequential(ScaledConv(IN, OUT, 3), MeanOnlyBatchNorm2d(OUT))
    with pytest.raises(WnormError, match="forward not overridden"):
        wnorm.fuse_mean_only(net)
    # next to a real pair, it stays two plain calls and keeps its override
    net = perturb(nn.Sequential(ScaledConv(IN, OUT, 3), MeanOnlyBatchNorm2d(OUT), nn.Tanh(),
                                nn.Conv2d(OUT, OUT, 1), MeanOnlyBatchNorm2d(OUT)).to(D))
    ref, fz = twins(net)
    x = batch(CONV_SHAPE)
    with torch.no_grad():
        close(fz(x), ref(x), RTOL64)


def test_subclass_overriding_forward_is_not_fused():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(Doubled(IN, OUT, 3), MeanOnlyBatchNorm2d(OUT))
    with pytest.raises(WnormError, match="forward not overridden"):
        wnorm.fuse_mean_only(net)


# -------------------------------------------------------------------- 5. the layer's own bias
def test_layer_bias_is_cancelled_in_train_and_used_in_eval(fused_pairs):
    ref, fz = twins(pair_net(nn.Conv2d, {"stride": 2})[0])
    layer, bn = fz[0], fz[1]
    x = batch(CONV_SHAPE)
    forward_backward(ref, x)
    forward_backward(fz, x)
    assert_same_state(ref, fz, RTOL64)
    scale = float(bn.bias.grad.abs().max())
    assert scale > 1e-2
    assert layer.bias.grad.abs().max() <= 1e-12 * scale  # as unfused: only rounding
    assert ref[0].bias.grad.abs().max() <= 1e-12 * scale
    probe = copy.deepcopy(fz)
    with torch.no_grad():  # a train-mode output ignores the layer bias
        before = probe(x)
        probe[0].bias.add_(3.0)
        close(probe(x), before, RTOL64, 3.0)
    fz.eval(), ref.eval()
    fz.zero_grad(), ref.zero_grad()
    forward_backward(ref, x)
    forward_backward(fz, x)
    assert_same_state(ref, fz, RTOL64)
    close(layer.bias.grad, bn.bias.grad, RTOL64)  # eval: y = conv + b_layer + b_bn - mu
    probe = copy.deepcopy(fz)
    with torch.no_grad():
        before = probe[:2](x)
        probe[0].bias.add_(0.5)
        close(probe[:2](x), before + 0.5, RTOL64)
    assert fused_pairs["fused"] == 6


# ------------------------------------------------------------- 6. container, copies, state
def test_container_keeps_repr_keys_parameters_and_can_be_undone(fused_pairs):
    net = wn_net()
    before_repr, before_keys = repr(net), list(net.state_dict())
    before_params = list(net.named_parameters())
    x = batch(WN_SHAPE)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert wnorm.fuse_mean_only(net) is net
    assert type(net) is not nn.Sequential and isinstance(net, nn.Sequential)
    assert repr(net) == before_repr and list(net.state_dict()) == before_keys
    after_params = list(net.named_parameters())
    assert [n for n, _ in after_params] == [n for n, _ in before_params]
    assert all(p is q for (_, p), (_, q) in zip(after_params, before_params))  # same tensors
    assert wnorm.fuse_mean_only(net) is net  # a second call: nothing new, no error
    with torch.no_grad():
        close(net(x), y, RTOL64)
    assert fused_pairs["fused"] == 3
    assert wnorm.fuse_mean_only(net, enabled=False) is net
    assert type(net) is nn.Sequential and repr(net) == before_repr
    with torch.no_grad():
        close(net(x), y, RTOL64)
    assert fused_pairs["fused"] == 3  # nothing fused any more
    wnorm.fuse_mean_only(net, enabled=False)  # undoing twice (or on a plain model) is fine


def test_only_sequential_containers_holding_a_pair_change():
    inner = nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4))
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    net = nn.Sequential(inner, other)
    wnorm.fuse_mean_only(net)
    assert type(inner) is not nn.Sequential
    assert type(other) is nn.Sequential and type(net) is nn.Sequential


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_keep_fusion_and_outputs(how, fused_pairs, copied):
    ref, fz = twins(wn_net())
    run_twins(ref, fz, WN_SHAPE, train=True, steps=2)
    ref.zero_grad(), fz.zero_grad()  # torch.save keeps no .grad
    copied = copied(fz, how)
    assert type(copied) is type(fz) and repr(copied) == repr(ref)
    assert_same_state(fz, copied, 0.0)
    fused_pairs.clear()
    run_twins(ref, copied, WN_SHAPE, train=True, steps=2)
    assert_same_state(ref, copied, RTOL64)
    assert fused_pairs["fused"] == 3 * 2


def test_state_dicts_load_across_fused_and_unfused():
    ref, fz = twins(wn_net())
    ref.train()
    with torch.no_grad():
        ref(batch(WN_SHAPE))  # running means that differ from the copy's
    x = batch(WN_SHAPE)
    fresh_fused = wnorm.fuse_mean_only(wn_net())
    fresh_fused.load_state_dict(ref.state_dict())  # strict: the same keys
    fz.load_state_dict(ref.state_dict())
    plain = wn_net()
    plain.load_state_dict(fz.state_dict())
    for m in (ref, fz, fresh_fused, plain):
        m.eval()
    with torch.no_grad():
        y = ref(x)
        for m in (fz, fresh_fused, plain):
            close(m(x), y, RTOL64)


# ------------------------------------------------------------------------------ 7. data init
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_data_init_gives_the_same_parameters(train, fused_pairs):
    ref, fz = twins(wn_net())
    ref.train(train), fz.train(train)
    x = batch((16,) + WN_SHAPE[1:])
    reports = [wnorm.data_init(m, x) for m in (ref, fz)]
    assert [(r.name, r.status) for r in reports[0]] == [(r.name, r.status) for r in reports[1]]
    assert len(reports[1].initialized) == 3
    for a, b in zip(*reports):
        close(b.mu, a.mu, RTOL64)
        close(b.sigma, a.sigma, RTOL64)
    assert_same_state(ref, fz, RTOL64)
    assert fused_pairs["fused"] == 0  # data_init's hooks: the plain calls
    ref.train(), fz.train()
    run_twins(ref, fz, WN_SHAPE, train=True, steps=1)  # its hooks are gone: fused again
    assert fused_pairs["fused"] == 3


# ---------------------------------------------------------------------------------- 8. errors
NO_PAIR = {
    "empty": lambda: nn.Sequential(),
    "not-adjacent": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), MeanOnlyBatchNorm2d(4)),
    "bn-first": lambda: nn.Sequential(MeanOnlyBatchNorm2d(3), nn.Conv2d(3, 4, 3)),
    "wrong-rank": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), MeanOnlyBatchNorm1d(4)),
    "wrong-channels": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), MeanOnlyBatchNorm2d(5)),
    "padding-same": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"),
                                          MeanOnlyBatchNorm2d(4)),
    "padding-reflect": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                             MeanOnlyBatchNorm2d(4)),
    "full-batchnorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    "module-list": lambda: nn.ModuleList([nn.Linear(3, 4), MeanOnlyBatchNorm1d(4)]),
}


@pytest.mark.parametrize("case", list(NO_PAIR))
def test_model_without_a_pair_is_refused(case):
    net = NO_PAIR[case]()
    with pytest.raises(WnormError, match=r"fuse_mean_only: \w+ has no pair to fuse: a pair is a "
                                         r"Linear, ConvNd or ConvTransposeNd"):
        wnorm.fuse_mean_only(net)
    assert all(type(m) is not mof._MeanOnlyFusedSequential for m in net.modules())


def test_wrong_channel_count_next_to_a_fused_pair_raises_the_bn_error(fused_pairs):
    net = nn.Sequential(nn.Conv2d(IN, OUT, 3), MeanOnlyBatchNorm2d(OUT),
                        nn.Conv2d(OUT, 4, 1), MeanOnlyBatchNorm2d(5))
    wnorm.fuse_mean_only(net)  # the first pair is fused; the second is not a pair
    with pytest.raises(WnormError, match=r"MeanOnlyBatchNorm2d: expected 5 channels in dim 1; "
                                         r"got shape \(3, 4, 5, 6\)"):
        net(batch(CONV_SHAPE, torch.float32))
    assert fused_pairs["fused"] == 1


# ------------------------------------------------------------------------------------ 9. fold
def test_eval_fused_equals_folded_model(fused_pairs):
    ref, fz = twins(wn_net())
    run_twins(ref, fz, WN_SHAPE, train=True)  # running means and a trained-looking state
    ref.eval(), fz.eval()
    folded = wnorm.fold(copy.deepcopy(ref))
    assert not any(isinstance(m, _MeanOnlyBatchNorm) for m in folded.modules())
    x = batch(WN_SHAPE, offset=-1.0)
    with torch.no_grad():
        close(fz(x), folded(x), RTOL64)
        close(wnorm.fold(copy.deepcopy(fz))(x), folded(x), RTOL64)  # folding a fused model too


# ------------------------------------------------------------ the container's plan of pairs
def test_plan_follows_changes_to_the_container(fused_pairs):
    """The pairs are decided once per container and remade when its modules change."""
    ref, fz = twins(pair_net(nn.Conv2d, {})[0])
    x = batch(CONV_SHAPE)
    with torch.no_grad():
        close(fz(x), ref(x), RTOL64)
        assert fused_pairs["fused"] == 1
        # a module inserted between the layer and its BN: no pair any more
        for m in (ref, fz):
            m.insert(1, nn.Tanh())
        close(fz(x), ref(x), RTOL64)
        assert fused_pairs["fused"] == 1 and fused_pairs["plain"] == 0
        # replaced modules: the new layer and BN form a pair again
        for m in (ref, fz):
            del m[1]
            torch.manual_seed(1)
            m[0] = nn.Conv2d(IN, OUT, 3, stride=2).to(D)
        close(fz(x), ref(x), RTOL64)
        assert fused_pairs["fused"] == 2
        # a weight-normalized layer (its class changes) is still a pair
        for m in (ref, fz):
            wnorm.apply(m)
        close(fz(x), ref(x), RTOL64)
        assert fused_pairs["fused"] == 3
    assert "_wnorm_plan" in fz.__dict__
    assert "_wnorm_plan" not in copy.deepcopy(fz).__dict__  # derived: never copied or pickled


# ------------------------------- a leaky ReLU / ReLU before a conv pair, folded into its function
def act_net(act: nn.Module, second: type[nn.Module] = nn.Conv2d, **opts: Any) -> nn.Sequential:
    """conv pair, activation, second conv pair (the activation + second pair fuse together)."""
    torch.manual_seed(5)
    return perturb(nn.Sequential(
        nn.Conv2d(IN, OUT, 3, padding=1, bias=False), MeanOnlyBatchNorm2d(OUT), act,
        second(OUT, OUT, 3, **opts), MeanOnlyBatchNorm2d(OUT), nn.Tanh()).to(D))


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp-kernels", "torch-ops"])
@pytest.mark.parametrize("act, second, opts", [
    (nn.LeakyReLU(0.1), nn.Conv2d, {"padding": 1}),
    (nn.ReLU(), nn.Conv2d, {"stride": 2, "groups": 2}),
    (nn.LeakyReLU(0.3), nn.ConvTranspose2d, {"stride": 2, "output_padding": 1}),
], ids=["leaky", "relu-strided-grouped", "leaky-transposed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_activation_folded_into_the_next_pair(act, second, opts, train, kernels, fused_pairs,
                                              monkeypatch):
    if not kernels:
        monkeypatch.setattr(mof, "_act_kernels", lambda u: None)
    elif mof._act_kernels(torch.zeros(2, 2, dtype=D)) is None:
        pytest.skip("wnorm's C++ kernels are not available here")
    ref, fz = twins(act_net(act, second, **opts))
    calls = run_twins(ref, fz, CONV_SHAPE, train)
    if train:
        assert fused_pairs["with activation"] == calls and fused_pairs["fused"] == 2 * calls
    else:  # the no-grad train passes fold it; eval runs the activation, then the pair
        assert fused_pairs["with activation"] == calls - 1


def test_activation_folded_float32_and_channels_last(fused_pairs):
    net = act_net(nn.LeakyReLU(0.1), padding=1).float()
    ref, fz = twins(net)
    run_twins(ref, fz, CONV_SHAPE, True, dtype=torch.float32, rtol=RTOL32)
    x = batch(CONV_SHAPE, torch.float32).to(memory_format=torch.channels_last)
    y1, g1 = forward_backward(ref, x)
    y2, g2 = forward_backward(fz, x)  # not contiguous inside: the torch-ops path
    close(y2, y1, RTOL32)
    close(g2, g1, RTOL32, float(g1.abs().max()))


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_act_conv_mean_only_gradcheck_and_gradgradcheck(slope):
    torch.manual_seed(0)
    u = torch.randn(3, 4, 6, 5, dtype=D, requires_grad=True)
    u.data[0, 0, 0, :2] = torch.tensor([0.5, -0.5], dtype=D)  # away from the kink at 0
    w = torch.randn(6, 2, 3, 3, dtype=D, requires_grad=True)
    shift = torch.randn(6, dtype=D, requires_grad=True)
    args = ([2, 1], [1, 0], [1, 1], False, [0, 0], 2)

    def f(a, b, c):
        return mof._ActConvMeanOnly.apply(a, b, c, args, slope)[0]

    assert torch.autograd.gradcheck(f, (u, w, shift))
    assert torch.autograd.gradgradcheck(f, (u, w, shift))


def test_activation_not_folded_when_in_place_or_hooked(fused_pairs):
    ref, fz = twins(act_net(nn.LeakyReLU(0.1, inplace=True), padding=1))
    run_twins(ref, fz, CONV_SHAPE, True, steps=1)
    assert fused_pairs["with activation"] == 0 and fused_pairs["fused"] == 2  # pairs only
    ref, fz = twins(act_net(nn.ReLU(), padding=1))
    seen = []
    for m in (ref[2], fz[2]):
        m.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
    run_twins(ref, fz, CONV_SHAPE, True, steps=1)
    assert len(seen) == 2  # the hook ran in both, on the same values
    close(seen[1], seen[0], RTOL64)
    assert fused_pairs["with activation"] == 0


# ------------------------------------------------------------------ found in review, kept fixed
def test_half_precision_pairs_are_not_fused(fused_pairs):
    """float16: the batch sum of the input would overflow (65504): the plain calls run."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), MeanOnlyBatchNorm2d(8)).half()
    ref, fz = twins(net)
    x = (torch.randn(64, 3, 32, 32) + 1).half()
    assert torch.equal(fz(x), ref(x))
    assert torch.equal(fz[1].running_mean, ref[1].running_mean)
    assert fused_pairs["fused"] == 0 and fused_pairs["plain"] == 1


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp-kernels", "torch-ops"])
def test_relu_of_minus_inf_is_zero_not_nan(kernels, monkeypatch):
    """A folded ReLU must not compute 0 * -inf (NaN) where nn.ReLU gives 0."""
    if not kernels:
        monkeypatch.setattr(mof, "_act_kernels", lambda u: None)
    torch.manual_seed(0)
    ref, fz = twins(perturb(nn.Sequential(nn.ReLU(), nn.Conv2d(IN, OUT, 3),
                                          MeanOnlyBatchNorm2d(OUT)).to(D)))
    u = batch(CONV_SHAPE)
    u[0, 0, 0, 0] = -float("inf")
    outs = []
    for m in (ref, fz):
        x = u.clone().requires_grad_(True)
        y = m(x)
        y.sum().backward()
        outs.append((y, x.grad))
    assert not outs[1][0].isnan().any() and not outs[1][1].isnan().any()
    close(outs[1][0], outs[0][0], RTOL64)
    close(outs[1][1], outs[0][1], RTOL64, float(outs[0][1].abs().max()))


def test_disabling_drops_the_plan_and_the_model_pickles():
    net = wnorm.apply(act_net(nn.ReLU(), padding=1))
    wnorm.fuse_mean_only(net)
    net(batch(CONV_SHAPE))
    wnorm.fuse_mean_only(net, enabled=False)
    assert type(net) is nn.Sequential and "_wnorm_plan" not in net.__dict__
    torch.save(net, io.BytesIO())


def test_a_pass_under_inference_mode_does_not_poison_a_later_double_backward():
    net = wnorm.fuse_mean_only(nn.Sequential(nn.Conv2d(3, 4, 3), MeanOnlyBatchNorm2d(
        4, track_running_stats=False)).to(D))
    x = batch((3, 3, 7, 9))  # a shape not seen before: its tap matrices are made now
    with torch.inference_mode():
        net(x)
    xi = x.clone().requires_grad_(True)
    gx, = torch.autograd.grad(net(xi).square().sum(), xi, create_graph=True)
    gx.sum().backward()


def test_in_place_edit_of_the_input_after_a_folded_activation():
    """A skip path's in-place ReLU on the block input, after the branch used it (unfused
    nn.ReLU saves only its output, so this works there too)."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                        MeanOnlyBatchNorm2d(4))
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.branch(x) + self.act(x)

    torch.manual_seed(0)
    ref = Block().to(D)
    fz = wnorm.fuse_mean_only(copy.deepcopy(ref))
    x0 = batch((3, 4, 6, 6))
    grads = []
    for m in (ref, fz):
        x = x0.clone().requires_grad_(True)
        m(x * 1.0).sum().backward()
        grads.append(x.grad)
    close(grads[1], grads[0], RTOL64, float(grads[0].abs().max()))


# ------------------------------------------ found in the review of the conv-mean kernel, kept fixed
def test_batched_gradients_through_fused_pairs_equal_the_unfused(mean_path):
    """vmap over the backward (jacobian(vectorize=True)) hands the backward batched gradients,
    which have no storage: the kernels must not read them (they crashed) and the Jacobian must
    equal the unfused model's. Both a plain conv pair and an activation + conv pair."""
    ref = act_net(nn.LeakyReLU(0.1), padding=1)
    fz = wnorm.fuse_mean_only(copy.deepcopy(ref))
    x = batch((2, IN, 4, 3))
    jr = torch.autograd.functional.jacobian(ref, x, vectorize=True)
    jf = torch.autograd.functional.jacobian(fz, x, vectorize=True)
    close(jf, jr, RTOL64, float(jr.abs().max()))


def test_fake_tensor_mode_runs_the_fused_pairs_without_reading_data(mean_path):
    """Under FakeTensorMode (shape and memory inference) tensors have no data: the fused pairs
    take the PyTorch-ops path and give the unfused model's shapes (the kernels crashed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mof._taps.cache_clear(), mof._unread.cache_clear()
    ref = act_net(nn.ReLU(), padding=1)
    net = wnorm.fuse_mean_only(copy.deepcopy(ref))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = net(torch.empty(2, IN, 7, 8, dtype=D))
        y.sum().backward()
    assert tuple(y.shape) == (2, OUT, 7, 8)
    assert mean_path["kernel"] == 0
    # the constants made under the mode were not cached: a real run of the same shapes works
    net.zero_grad(set_to_none=True)
    x = batch((2, IN, 7, 8))
    close(net(x), ref(x), RTOL64)


def test_inference_mode_with_a_model_in_train_mode_runs_activation_pairs(mean_path):
    """inference_mode + train mode: batch means, no graph. The activation + conv pair kept the
    input's version counter, which inference tensors lack (it crashed)."""
    ref, fz = twins(act_net(nn.LeakyReLU(0.1), padding=1))
    x = batch(CONV_SHAPE)
    with torch.inference_mode():
        y2 = fz(x)
        y1 = ref(x)
    close(y2, y1, RTOL64)
    assert_same_state(ref, fz, RTOL64)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double-backward"])
def test_inputs_no_tap_reads_do_not_reach_the_mean(create_graph, mean_path):
    """With a stride longer than the kernel some input positions are never read: an inf or NaN
    there leaves the unfused pair finite, so the fused pair must be too (the PyTorch-ops path
    multiplied it by a 0 tap: NaN everywhere), gradients and second derivatives included."""
    torch.manual_seed(0)
    ref = perturb(nn.Sequential(nn.Conv2d(2, 3, 2, stride=3, bias=False),
                                MeanOnlyBatchNorm2d(3)).to(D))
    fz = wnorm.fuse_mean_only(copy.deepcopy(ref))
    x = batch((2, 2, 7, 8))
    x[:, :, 2, :] = float("inf")  # rows 2 and 5 and column 2 are never read
    x[:, :, :, 2] = float("nan")
    x[:, :, 5, :] = -float("inf")
    results = []
    for net in (ref, fz):
        xx = x.clone().requires_grad_(True)
        y = net(xx)
        gw, gx = torch.autograd.grad((y * weights_like(y)).sum(), [net[0].weight, xx],
                                     create_graph=create_graph)
        assert y.isfinite().all() and gw.isfinite().all() and gx.isfinite().all()
        if create_graph:
            (ggw,) = torch.autograd.grad(gx.square().sum(), net[0].weight)
            assert ggw.isfinite().all()
            results.append(ggw)
        results += [y.detach(), gw.detach(), gx.detach()]
    half = len(results) // 2
    for a, b in zip(results[half:], results[:half]):
        close(a, b, RTOL64, float(b.abs().max()))
    assert (mean_path["kernel"] > 0) == (mean_path["path"] == "cpp-kernels")


def test_conv_mean_kernel_refuses_a_weight_without_outputs():
    """A weight with 0 output channels divided by zero in the kernel (SIGFPE): now an error."""
    kern = kernel_or_skip()
    with pytest.raises(RuntimeError, match="does not fit"):
        kern.conv_mean_forward(torch.randn(3, 8, dtype=D), torch.randn(0, 3, 3, dtype=D),
                               [torch.ones(3, 8, dtype=D)], 1, 24)


def test_conv_mean_kernel_float32_mean_is_rounded_once():
    """The kernel accumulates in double: its float32 mean is the exact mean of its float32
    inputs rounded once (to within 2 ulp), where a float32 dot product of 4608 terms was
    several times further off."""
    kern = kernel_or_skip()
    torch.manual_seed(0)
    x = torch.randn(8, 512, 9, 9) + 1.0
    w = torch.randn(64, 512, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    ctx = type("Ctx", (), {})()
    mof._conv_mean(ctx, x, x.sum(0, keepdim=True), w, args)
    mean, _ = kern.conv_mean_forward(x.sum(0), w, list(ctx.taps), 1, ctx.count)
    exact = torch.convolution(x.double(), w.double(), None, *args).mean(dim=(0, 2, 3))
    ulp = torch.finfo(torch.float32).eps * exact.abs().max()
    assert (mean.double() - exact).abs().max() <= 2 * ulp


def test_fake_tensors_used_outside_their_mode_get_the_plain_calls():
    """A model and input made under FakeTensorMode and called after it: the fused pairs fall
    back to the plain calls (their cached real constants would meet fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        net = nn.Sequential(
            nn.Conv2d(IN, OUT, 3, padding=1, bias=False, dtype=D),
            MeanOnlyBatchNorm2d(OUT, dtype=D),
            nn.LeakyReLU(0.1), nn.Conv2d(OUT, OUT, 3, padding=1, dtype=D),
            MeanOnlyBatchNorm2d(OUT, dtype=D))
        x = torch.empty(2, IN, 7, 8, dtype=D)
    fz = wnorm.fuse_mean_only(net)
    y = fz(x)
    y.sum().backward()
    assert isinstance(y, FakeTensor) and tuple(y.shape) == (2, OUT, 7, 8)


@pytest.mark.parametrize("batch", [4, 300], ids=["small-batch", "large-batch"])
def test_functorch_transforms_through_fused_pairs_equal_the_unfused(batch):
    """vmap and jvp over a model with batch statistics (track_running_stats=False): the conv
    pairs' autograd Functions have no functorch rules, so under a transform conv pairs take
    the plain calls and Linear pairs the centered form, at any batch size."""
    torch.manual_seed(0)
    ref = perturb(nn.Sequential(
        nn.Conv1d(2, 3, 3, bias=False), MeanOnlyBatchNorm1d(3, track_running_stats=False),
        nn.LeakyReLU(0.1), nn.Conv1d(3, 3, 3), MeanOnlyBatchNorm1d(3, track_running_stats=False),
        nn.Flatten(), nn.Linear(3 * 4, 5), MeanOnlyBatchNorm1d(5, track_running_stats=False),
    ).to(D))
    fz = wnorm.fuse_mean_only(copy.deepcopy(ref))
    xb = torch.randn(2, batch, 2, 8, dtype=D)
    with torch.no_grad():
        close(torch.func.vmap(fz)(xb), torch.func.vmap(ref)(xb), RTOL64)
    x, t = xb[0], torch.randn(batch, 2, 8, dtype=D)
    y1, j1 = torch.func.jvp(ref, (x,), (t,))  # parameters that require grad
    y2, j2 = torch.func.jvp(fz, (x,), (t,))
    close(y2.detach(), y1.detach(), RTOL64)
    close(j2.detach(), j1.detach(), RTOL64, float(j1.detach().abs().max()))
