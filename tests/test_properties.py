"""Property-based tests (hypothesis) across layer types, random small shapes, every valid
``dim`` (the default, every other axis, None) and float32/float64:

- w = g v/||v|| and ||w|| = |g| per unit (along the layer's output-unit axis or the given
  ``dim``), whatever g and v become;
- fold keeps the eval outputs;
- a checkpoint converted to every layout (plain, torch-old, torch-new, wnorm) loads back into
  a fresh model with the same outputs;
- the gradients of g and v equal the paper's eqs. (3)-(4), computed independently from the
  gradient of a plain layer holding w.

Settings: ``max_examples=60`` per property, ``deadline=None``, derandomized (the same examples
on every run, so CI is reproducible). To explore more:
``WNORM_HYPOTHESIS_EXAMPLES=500 WNORM_HYPOTHESIS_RANDOM=1 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wnorm
from wnorm._layouts import FORMATS
from wnorm.state_dict import convert_state_dict
from wnorm.state_dict import load_state_dict as wnorm_load_state_dict

EXAMPLES = int(os.environ.get("WNORM_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    derandomize=os.environ.get("WNORM_HYPOTHESIS_RANDOM") is None,
                    suppress_health_check=[HealthCheck.too_slow])

KINDS = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
         "ConvTranspose3d", "Embedding", "LSTM", "GRU"]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


@dataclass
class Case:
    kind: str
    make: Callable[[], nn.Module]  # the plain layer, deterministic
    names: list[str]  # the weights to normalize
    dim: Any  # "default", None or an int
    dtype: torch.dtype
    x: torch.Tensor

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = self.make().to(self.dtype)
        for name in self.names:
            if self.dim == "default":
                wnorm.weight_norm(m, name)
            else:
                wnorm.weight_norm(m, name, self.dim)
        return m

    def __repr__(self) -> str:
        return f"Case({self.kind}, dim={self.dim}, {self.dtype}, x={tuple(self.x.shape)})"


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(DTYPES))
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "Linear":
        make, names, ndim = (lambda: nn.Linear(a, b)), ["weight"], 2
        x = torch.randn(3, a, generator=gen)
    elif kind.startswith("Conv"):
        nd = int(kind[-2])
        ks = [draw(st.integers(1, 3)) for _ in range(nd)]
        size = [k + draw(st.integers(0, 2)) for k in ks]
        cls = getattr(nn, kind)
        make, names, ndim = (lambda: cls(a, b, ks)), ["weight"], nd + 2
        x = torch.randn(2, a, *size, generator=gen)
    elif kind == "Embedding":
        make, names, ndim = (lambda: nn.Embedding(a + 1, b)), ["weight"], 2
        x = torch.randint(0, a + 1, (2, 3), generator=gen)
    else:
        layers, bi = draw(st.integers(1, 2)), draw(st.booleans())
        cls = getattr(nn, kind)
        make = lambda: cls(a, b, num_layers=layers, bidirectional=bi, batch_first=True)  # noqa: E731
        names = [n for n in make()._flat_weights_names if n.startswith("weight_")]
        ndim = 2
        x = torch.randn(2, 3, a, generator=gen)
    # negative dims are refused by wnorm (PyTorch reads dim=-1 as "the whole tensor")
    dim = draw(st.one_of(st.just("default"), st.none(), st.integers(0, ndim - 1)))
    if x.is_floating_point():
        x = x.to(dtype)
    return Case(kind, make, names, dim, dtype, x)


def out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = m(x)
    return y[0] if isinstance(y, tuple) else y


def axis(m: nn.Module, name: str) -> int | None:
    return m.__dict__["_wn"][name].dim


def norm_keep(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """||v|| over every axis but dim, kept-dim; computed here, not by wnorm."""
    if dim is None:
        return v.pow(2).sum().sqrt()
    axes = [d for d in range(v.dim()) if d != dim]
    return v.pow(2).sum(dim=axes, keepdim=True).sqrt() if axes else v.abs()


def perturb(m: nn.Module, seed: int) -> None:
    """A random update of every g and v (g may change sign)."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)  # not the init's stream (g - g = 0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --------------------------------------------------------------------------- properties
def unit_axis(case: Case) -> int | None:
    """The axis of the output units, from the layer type: ConvTranspose stores (in, out, *k)."""
    if case.dim != "default":
        return case.dim
    return 1 if case.kind.startswith("ConvTranspose") else 0


@SETTINGS
@given(case=cases(), seed=st.integers(0, 1000))
def test_w_equals_g_v_over_norm_v_and_its_norm_is_g_per_unit(case: Case, seed: int) -> None:
    """Eq. 2 computed here, one g per slice along the unit axis: a weight with the right norms
    in a wrong direction (|v|, a permuted v) fails it."""
    m = case.build(0)
    perturb(m, seed)
    d = unit_axis(case)
    for train in (True, False):  # the recorded weight, and the cached inference weight
        m.train(train)
        with torch.set_grad_enabled(train):
            for name in case.names:
                assert axis(m, name) == d
                w, g, v = (getattr(m, name + s).detach() for s in ("", "_g", "_v"))
                assert w.dtype == case.dtype
                torch.testing.assert_close(norm_keep(w, d), g.abs(), **TOL[case.dtype])
                torch.testing.assert_close(w, g * v / norm_keep(v, d), **TOL[case.dtype])


@SETTINGS
@given(case=cases(), seed=st.integers(0, 1000))
def test_fold_keeps_outputs(case: Case, seed: int) -> None:
    m = case.build(0)
    perturb(m, seed)
    m.eval()
    with torch.no_grad():
        before = out(m, case.x)
        folded = wnorm.fold(copy.deepcopy(m)).eval()
        assert not wnorm.is_weight_normalized(folded)
        assert type(folded) is getattr(nn, case.kind)
        torch.testing.assert_close(out(folded, case.x), before, **TOL[case.dtype])


@SETTINGS
@given(case=cases(), seed=st.integers(0, 1000), fmt=st.sampled_from(FORMATS))
def test_checkpoint_round_trip_through_every_format(case: Case, seed: int, fmt: str) -> None:
    m = case.build(0)
    perturb(m, seed)
    m.eval()
    sd = convert_state_dict(m.state_dict(), fmt)
    # and back through a second layout: the round trip keeps the weights
    back = convert_state_dict(sd, "wnorm")
    target = case.build(1).eval()  # another init: everything must come from the file
    wnorm_load_state_dict(target, back if fmt == "torch-new" else sd)
    with torch.no_grad():
        torch.testing.assert_close(out(target, case.x), out(m, case.x), **TOL[case.dtype])
    # the pairs were renamed, not recomputed: every layout but "plain" keeps each pair on its
    # own axis, so g and v come back bitwise
    if fmt != "plain":
        for name in case.names:
            assert torch.equal(getattr(target, name + "_v"), getattr(m, name + "_v"))
            assert torch.equal(getattr(target, name + "_g"), getattr(m, name + "_g"))


@SETTINGS
@given(case=cases(), seed=st.integers(0, 1000))
def test_gradients_equal_eqs_3_4(case: Case, seed: int) -> None:
    m = case.build(0)
    perturb(m, seed)
    plain = copy.deepcopy(m)
    for name in case.names:
        wnorm.remove_weight_norm(plain, name)  # a plain layer holding w = g v / ||v||
    y = out(m, case.x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * probe).sum().backward()
    (out(plain, case.x) * probe).sum().backward()
    for name in case.names:
        d = axis(m, name)
        g, v = getattr(m, name + "_g").detach(), getattr(m, name + "_v").detach()
        grad_w = getattr(plain, name).grad
        nv = norm_keep(v, d)
        axes = list(range(v.dim())) if d is None else [a for a in range(v.dim()) if a != d]
        grad_g = (grad_w * v).sum(dim=axes, keepdim=d is not None) / nv  # eq. (3)
        grad_v = g / nv * grad_w - g * grad_g / nv**2 * v  # eq. (4)
        # atol relative to the size of the terms (eq. 4 cancels them where ||v|| is small)
        scale = {k: max(1.0, float(t.abs().max()))
                 for k, t in (("g", grad_g), ("v", g / nv * grad_w))}
        tol = TOL[case.dtype]
        torch.testing.assert_close(getattr(m, name + "_g").grad, grad_g, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale["g"] * 10)
        torch.testing.assert_close(getattr(m, name + "_v").grad, grad_v, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale["v"] * 10)
