"""Mixed precision: wnorm under bf16/fp16 autocast and with half-precision parameters.

The dtype contract (also in docs/guarantees.md):

==========================  ==========  =================  ============  ==============  =========
parameters                  autocast    g, v and grads     ``weight``    layer output    norm in
==========================  ==========  =================  ============  ==============  =========
float32                     none        float32            float32       float32         float32
float32                     bf16/fp16   float32            float32       autocast dtype  float32
``.half()``/``.bfloat16()`` any         params' dtype      params' dtype params' dtype   float32
==========================  ==========  =================  ============  ==============  =========

``data_init`` statistics (``mu``, ``sigma``) are float32 in every case; g keeps its dtype.
CUDA cases run when a GPU is present and are skipped otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import normalized_weights

import wnorm
from nets import Tagger, mean_only_convnet

LOW = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def convnet() -> nn.Module:
    return wnorm.apply(mean_only_convnet())


def _cpu_fp16_lstm_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            nn.LSTM(2, 2)(torch.randn(3, 1, 2))
        return True
    except RuntimeError:
        return False


def model_and_input(kind: str, device: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "convnet":
        return convnet().to(device), torch.randn(6, 3, 8, 8, device=device)
    return wnorm.apply(Tagger()).to(device), torch.randn(3, 7, 4, device=device)


# --------------------------------------------------------------------------- float32 params
def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float, name: str) -> None:
    """Every entry within ``tol`` of ``want``'s largest: a low-precision matmul's error is
    relative to its sum's terms, not to an entry that cancels to near 0."""
    got, want = got.detach().float(), want.detach()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= tol * scale, f"{name}: off by {err:.3g}, {err / scale:.2%} of {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["convnet", "lstm"])
def test_autocast_weight_is_the_float32_one_and_results_match_float32(kind, dtype, device
                                                                      ) -> None:
    """Under autocast the normalized weight is computed from float32 g and v in float32: the
    same bits as without autocast (a norm or weight computed in the autocast dtype and cast
    back is off by that dtype's rounding). Only the layers' matmuls run in the low dtype, so
    the outputs and g's gradients are float32's to that dtype's precision."""
    if kind == "lstm" and device == "cpu" and dtype == torch.float16 and not _cpu_fp16_lstm_works():
        pytest.skip("PyTorch's CPU LSTM has no float16 autocast kernel (plain nn.LSTM fails too)")
    model, x = model_and_input(kind, device)
    ref = copy.deepcopy(model)
    out_ref = ref(x)
    out_ref.square().mean().backward()
    with torch.autocast(device, dtype=dtype):
        out = model(x)
        weights = {f"{m}.{p}": getattr(mod, p)
                   for m, mod, p, _ in normalized_weights(model)}
    assert out.dtype == dtype  # the matmuls ran in the autocast dtype
    for m, mod, p, _ in normalized_weights(ref):
        w, want = weights[f"{m}.{p}"].detach(), getattr(mod, p).detach()
        assert w.dtype == torch.float32, f"{m}.{p}"
        off = float((w - want).abs().max())
        assert off == 0, f"{m}.{p}: {off:.3g} off the weight computed without autocast"
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert_close_to_scale(out, out_ref, 1e-2, "output")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        if name.endswith("_g"):
            assert_close_to_scale(p.grad, q.grad, 2e-2, name)
    g_grads = [p.grad for n, p in model.named_parameters() if n.endswith("_g")]
    assert any(bool(g.abs().sum() > 0) for g in g_grads)


# --------------------------------------------------------------------------- half params
def big_linear(dtype: torch.dtype, device: str = "cpu") -> nn.Linear:
    """A layer whose rows have norm sqrt(1000) * 3000 ~ 9.5e4 > 65504, the float16 maximum."""
    lin = wnorm.weight_norm(nn.Linear(1000, 3)).to(device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight_v.fill_(3000.0)
        lin.weight_v[1, :500] = -3000.0
        lin.weight_g.copy_(torch.tensor([[1.0], [2.0], [0.5]], dtype=dtype))
    return lin


def reference_weight(lin: nn.Linear) -> torch.Tensor:
    g, v = lin.weight_g.double(), lin.weight_v.double()
    return g * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_half_params_weight_has_their_dtype_computed_in_float32(dtype, device) -> None:
    lin = big_linear(dtype, device)
    naive = lin.weight_g * lin.weight_v / lin.weight_v.norm(dim=1, keepdim=True)
    if dtype == torch.float16:  # the case is real: a float16 norm overflows here
        assert not torch.isfinite(lin.weight_v.norm(dim=1)).all()
        assert not torch.allclose(naive.double(), reference_weight(lin), atol=1e-3)
    for mode in ("train", "eval"):  # the recorded path and the inference path
        lin.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            w = lin.weight
        assert w.dtype == dtype
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w.double(), reference_weight(lin), rtol=1e-2, atol=1e-4)
        # ||w|| = g per row, within the dtype's rounding
        torch.testing.assert_close(w.float().norm(dim=1), lin.weight_g.float().flatten(),
                                   rtol=1e-2, atol=0)
    lin.train()
    x = torch.randn(4, 1000, device=device, dtype=dtype)
    with torch.autocast(device, dtype=dtype):
        y = lin(x)
    y.float().sum().backward()
    assert y.dtype == dtype and torch.isfinite(y).all()
    for p in (lin.weight_g, lin.weight_v):
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_half_convnet_and_lstm_forward_backward_finite(dtype) -> None:
    for kind in ("convnet", "lstm"):
        if kind == "lstm" and dtype == torch.float16 and not _cpu_fp16_lstm_works():
            continue  # see above: a PyTorch CPU limitation
        model, x = model_and_input(kind, "cpu")
        model = model.to(dtype)
        out = model(x.to(dtype))
        out.float().square().mean().backward()
        assert out.dtype == dtype and torch.isfinite(out).all()
        for name, p in model.named_parameters():
            assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name


def test_float16_layer_with_unrepresentable_norm_is_an_error_not_inf() -> None:
    """g = ||w|| would be inf in float16: refused, naming the layer, instead of training on inf."""
    lin = nn.Linear(1000, 3).half()
    with torch.no_grad():
        lin.weight.fill_(3000.0)
    with pytest.raises(wnorm.WnormError, match=r"Linear: .*overflow torch.float16"):
        wnorm.weight_norm(lin)


def test_float16_balanced_weight_whose_l1_norms_overflow_is_an_error_not_inf() -> None:
    """A balanced weight norm's g is each row's L1 norm (82k here), above float16's 65504
    while the L2 norm (1.6k) is not: it took g = inf and gave NaN outputs."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 2).half()
    with torch.no_grad():
        lin.weight.normal_(0, 25)
    with pytest.raises(wnorm.WnormError, match=r"Linear: .*overflow torch.float16"):
        wnorm.balanced_weight_norm(lin)
    assert not hasattr(lin, "weight_g")  # the layer is as it was


@pytest.mark.parametrize("method", [wnorm.weight_norm, wnorm.balanced_weight_norm])
def test_a_float16_write_whose_norms_overflow_is_an_error_not_inf(method) -> None:
    """A row written with an L2 norm of 80k (float16 holds 65504) became g = inf and NaN
    outputs, without a word; the layer is left as it was."""
    lin = method(nn.Linear(64, 2).half())
    g = lin.weight_g.detach().clone()
    with torch.no_grad():
        # rows of mean 0 (a balanced map keeps a row's centered part): L2 80k, L1 640k
        lin.weight.copy_(torch.full((2, 64), 10000.0) * torch.tensor([1.0, -1.0]).repeat(32))
    with pytest.raises(wnorm.WnormError, match=r"Linear: 'weight' was written with rows whose "
                                               r"norms overflow torch.float16"):
        lin(torch.randn(1, 64).half())
    assert torch.equal(lin.weight_g, g)


# --------------------------------------------------------------------------- data init
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_data_init_statistics_in_float32_under_autocast(dtype) -> None:
    torch.manual_seed(1)
    ref = convnet()
    model = convnet()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(32, 3, 8, 8)
    ref_report = wnorm.data_init(ref, x)
    with torch.autocast("cpu", dtype=dtype):
        report = wnorm.data_init(model, x)
    assert [r.status for r in report] == ["initialized"] * 3
    for r, rr in zip(report, ref_report):
        assert r.mu.dtype == torch.float32 and r.sigma.dtype == torch.float32
        assert torch.isfinite(r.mu).all() and (r.sigma > 0).all()
        torch.testing.assert_close(r.sigma, rr.sigma, rtol=3e-2, atol=1e-3)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float32, name
        torch.testing.assert_close(p, q, rtol=5e-2, atol=2e-2)
    # the model is standardized on the init batch, computed in the autocast dtype
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        pre = model[0](x)
    t = pre.float().transpose(0, 1).reshape(8, -1)
    torch.testing.assert_close(t.std(1, unbiased=False), torch.ones(8), rtol=3e-2, atol=0)


def test_data_init_statistics_in_float32_for_bfloat16_params() -> None:
    model = convnet().bfloat16()
    report = wnorm.data_init(model, torch.randn(32, 3, 8, 8, dtype=torch.bfloat16))
    assert [r.status for r in report] == ["initialized"] * 3
    for r in report:
        assert r.mu.dtype == torch.float32 and r.sigma.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
