r"""The reparameterizations: small objects that map parameters :math:`(g, v)` to a weight :math:`w`.

Each map normalizes every slice of ``v`` along ``dim`` (one slice per output unit; ``dim=None``:
the whole tensor) and has an inverse, :meth:`split`, that turns a weight into parameters the
map sends back to it (exactly where the map can represent the weight). Attaching a map to a
module is :mod:`wnorm._reparam`'s job; the public functions are in :mod:`wnorm.weight_norm`
and :mod:`wnorm.family`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

__all__ = ["Map", "WeightNorm", "CenteredWeightNorm", "WeightStandardization", "ForcedWeightNorm",
           "BalancedWeightNorm", "norm", "graph_norm", "l1_norm", "METHODS", "same_weight",
           "settings", "kind_mismatch", "OTHER_MAP"]

_LOW = (torch.float16, torch.bfloat16)


def _axes(t: Tensor, dim: int | None) -> list[int]:
    return [d for d in range(t.dim()) if d != dim]


def norm(v: Tensor, dim: int | None) -> Tensor:
    r""":math:`\lVert v\rVert` of every slice along ``dim``, kept-dim (the shape of g)."""
    if dim is None:
        # norm_except_dim(v, 2, -1) gives the same value, but its forward-mode rule gives a
        # tangent of another shape, which made torch.func.jvp/hessian raise for dim=None
        return torch.linalg.vector_norm(v)
    # PyTorch's weight norm computes this norm (outside its fused cases): the same bits
    return torch.norm_except_dim(v, 2, dim)


def graph_norm(v: Tensor, dim: int | None) -> Tensor:
    """:func:`norm` by ``linalg.vector_norm``, for graphs and checkpoint conversion:
    norm_except_dim has no vmap rule (a model ensemble under ``torch.func.vmap`` ran a slow
    per-sample loop) and no legacy ONNX symbolic. It may round differently from :func:`norm`,
    which eager layers use."""
    if dim is None:
        return torch.linalg.vector_norm(v)
    axes = _axes(v, dim)
    return torch.linalg.vector_norm(v, dim=axes, keepdim=True) if axes else v.abs()


def _in_graph() -> bool:
    """Whether this runs inside a graph being compiled, traced or exported, or a torch.func
    transform: where eq. 2 is written out, with :func:`graph_norm`."""
    return (torch.compiler.is_compiling() or torch._C._is_tracing()
            or torch._C._are_functorch_transforms_active())


def _norm_here(v: Tensor, dim: int | None) -> Tensor:
    """:func:`norm` in eager mode, :func:`graph_norm` in a graph (legacy ONNX export of a
    half-precision or centered weight norm had no symbolic for norm_except_dim)."""
    return graph_norm(v, dim) if _in_graph() else norm(v, dim)


def l1_norm(v: Tensor, dim: int | None) -> Tensor:
    r""":math:`\lVert v\rVert_1` of every slice along ``dim``, kept-dim (the shape of g)."""
    axes = _axes(v, dim)
    if dim is None:
        return v.abs().sum()
    return v.abs().sum(dim=axes, keepdim=True) if axes else v.abs()


def _channels_last(v: Tensor) -> bool:
    """Whether ``v`` is laid out channels_last (a 4-d or 5-d conv weight after
    ``model.to(memory_format=torch.channels_last)``)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(v.dim())
    return fmt is not None and not v.is_contiguous() and v.is_contiguous(memory_format=fmt)


def formula_only(g: Tensor | None, v: Tensor) -> bool:
    """Whether the weight is computed by eq. 2 written out, with nothing held beside autograd's
    saved tensors: under forward-mode AD (``torch.func.jvp``/``hessian``) and ``torch.func``
    transforms (``jacrev(jacrev(...))``), which need every order of derivative; and for a g or
    v computed in the graph (MAML's fast weights, ``functional_call`` with tensors of a graph),
    which a hook or a cached weight's node would keep alive, with their graphs, for as long as
    the user keeps the loss (a list of logged losses)."""
    return (_forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
            or v.grad_fn is not None or (g is not None and g.grad_fn is not None))


class _SecondOrder:
    """A post-hook on the fused kernel's node: its backward run with ``create_graph=True``
    (Hessian-vector products, MAML) differentiates eq. 2 written out. The kernel's own double
    backward holds ``||v||`` constant, which gives wrong second derivatives in v; a first-order
    backward (grad mode off) keeps the kernel's result. It holds g and v, which are leaves (a
    layer's parameters, alive anyway); computed ones take the formula without a hook."""

    __slots__ = ("v", "g", "dim")

    def __init__(self, v: Tensor, g: Tensor, dim: int) -> None:
        self.v, self.g, self.dim = v, g, dim

    def __call__(self, grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> Any:
        if not torch.is_grad_enabled() or grad_outputs[0] is None:
            return None
        ins = [t for t, gi in zip((self.v, self.g), grad_inputs) if gi is not None]
        n = norm(self.v, self.dim)
        w = self.v * (self.g.reshape(n.shape) / n)
        got = iter(torch.autograd.grad(w, ins, grad_outputs[0], create_graph=True))
        return tuple(None if gi is None else next(got) for gi in grad_inputs)


def _fusable(v: Tensor, dim: int | None) -> bool:
    # torch._weight_norm runs one fused kernel forward and one backward in these cases
    return (dim is not None and (dim == 0 or dim == v.dim() - 1) and v.dtype not in _LOW
            and not v.is_complex() and v.device.type in ("cpu", "cuda"))


#: the public function behind each map kind (for messages)
METHODS = {"wn": "weight_norm", "centered": "centered_weight_norm",
           "standardized": "weight_standardization", "forced": "forced_weight_norm",
           "balanced": "balanced_weight_norm"}


def same_weight(a: str, b: str) -> bool:
    """Whether (g, v) saved under map kind ``a`` give the same weight under kind ``b``: a forced
    weight norm computes w = g v/||v|| as weight norm does (its v is only held on a sphere)."""
    return a == b or {a, b} <= {"wn", "forced"}


def settings(m: Map) -> dict[str, object]:
    """What besides its kind decides the weight a map gives for the same (g, v): ``dim`` and its
    options but a forced map's radius (where v is held, not what w is). Saved beside the kind:
    without a g (weight standardization, a fixed gain), another axis, eps or gain loads with
    every shape matching."""
    out: dict[str, object] = {"dim": m.dim}
    for k, x in m.options().items():
        if k != "radius":
            out[k] = None if x is None else float(x)  # type: ignore[arg-type]
    return out


def _described(kind: str, given: Any) -> str:
    opts = ", ".join(f"{k}={x!r}" for k, x in given.items()) if isinstance(given, Mapping) else ""
    return f"wnorm.{METHODS.get(kind, kind)}" + (f"({opts})" if opts else "")


def kind_mismatch(entry: Any, slots: Mapping[str, Map] | None, state_dict: Mapping[str, Any],
                  prefix: str) -> str:
    """What is wrong with loading the (g, v) that a module's state-dict metadata ``entry`` says
    were saved by maps of the kinds in ``entry["wnorm"]`` (``{name: kind}``), with the
    :func:`settings` in ``entry["wnorm_map"]``, into ``slots`` (``{name: Map}``; a name not in it
    is a plain or PyTorch-normalized weight, which reads (g, v) as a weight norm's; None: no
    model, read as weight norm's): "" when nothing is. wnorm's layers write that metadata in
    ``state_dict`` (entries written before the settings are compared by kind)."""
    saved = entry.get("wnorm") if isinstance(entry, Mapping) else None
    if not isinstance(saved, Mapping):
        return ""
    given = entry.get("wnorm_map")
    given = given if isinstance(given, Mapping) else {}
    bad = []
    for p, k in saved.items():
        if prefix + p + "_v" not in state_dict:
            continue
        m = (slots or {}).get(p)
        ours = "wn" if m is None else m.kind
        if not same_weight(str(k), ours):
            bad.append(f"'{prefix}{p}' was saved by {_described(str(k), None)}" + (
                "" if slots is None else ", the model's is " + (
                    _described(ours, None) if m is not None else
                    "plain or PyTorch's weight norm")))
        elif (m is not None and isinstance(given.get(p), Mapping) and str(k) == ours
              # a weight norm's g along another axis has another shape: refused by it, or
              # read along its own axis by wnorm.load_state_dict, which recomputes the weight
              and (not m.has_g or not same_weight(ours, "wn"))
              and dict(given[p]) != settings(m)):
            bad.append(f"'{prefix}{p}' was saved by {_described(str(k), given[p])}, the "
                       f"model's is {_described(ours, settings(m))}")
    return "; ".join(bad)


#: what to do about a kind_mismatch
OTHER_MAP = ("the same g and v give another weight under another map; load it into a model "
             "built with the same method (wnorm.apply(model, method=...)), or save wnorm.fold of "
             "the model and load that into a plain one")


class Map:
    """A reparameterization along ``dim``: ``weight(g, v)`` and its inverse ``split(w)``."""

    kind = ""
    has_g = True
    #: ``weight(g, c * v) == weight(g, v)`` for every per-slice factor ``c > 0`` (weight
    #: standardization: up to its eps, which project_ measures): then rescaling the slices of v
    #: (:func:`wnorm.sphere.project_`) leaves the weight as it is
    scale_invariant = False

    def __init__(self, dim: int | None) -> None:
        self.dim = dim

    def weight(self, g: Tensor | None, v: Tensor) -> Tensor:
        raise NotImplementedError

    def split(self, w: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(g, v)`` with ``weight(g, v) == w`` where the map can represent ``w``."""
        raise NotImplementedError

    def direction(self, v: Tensor) -> Tensor:
        """What is normalized: ``v`` itself, or ``v`` centered."""
        return v

    def options(self) -> dict[str, object]:
        """Settings beyond ``dim`` (compared when two holders of a tie share parameters)."""
        return {}

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.dim == self.dim  # type: ignore[attr-defined]
                and other.options() == self.options())  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.dim))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(dim={self.dim}{opts})"


class WeightNorm(Map):
    r""":math:`w = g\,v/\lVert v\rVert` (Salimans & Kingma, 2016, eq. 2).

    Computed by ``torch._weight_norm``, as PyTorch's own weight norm is: one fused kernel
    forward and one backward for ``dim`` 0 or the last axis, on CPU and CUDA, and the same bits
    as PyTorch for the same g and v (float32 and float64 parameters, eager mode; a channels_last
    conv weight is computed by the formula, keeping its layout, within 2 ulps). Derivatives
    of every order are eq. 2's: a backward that records a graph, forward-mode AD, ``torch.func``
    transforms and compiled, traced or exported graphs differentiate the formula written out
    (the kernel's own double backward holds :math:`\lVert v\rVert` constant, and it has no
    forward-mode rule); in a graph the values differ from eager ones by a few ulps.
    """

    kind = "wn"
    scale_invariant = True

    def weight(self, g: Tensor | None, v: Tensor) -> Tensor:
        if v.dtype in _LOW:
            # in float32 (a float16 sum of squares overflows), with the norm rounded to the
            # parameters' dtype as g was: then the weight a layer starts with (g = its rounded
            # norm) comes back bit for bit; a norm the dtype cannot hold is used unrounded
            n = _norm_here(v.float(), self.dim)
            r = n.to(v.dtype).float()
            n = torch.where(torch.isinf(r), n, r)
            return (v.float() * (g.float() / n)).to(v.dtype)  # type: ignore[union-attr]
        dim = -1 if self.dim is None else self.dim
        if _in_graph():
            # eq. 2 written out: its derivatives of every order are exact. A compiled, traced
            # or exported graph has no hook, and the fused kernel's double backward holds ||v||
            # constant (torch.compile of jacrev(jacrev(f)) and a traced HVP were wrong);
            # Inductor decomposes the kernel into this formula anyway
            n = graph_norm(v, self.dim)
            return v * (g.reshape(n.shape) / n)  # type: ignore[union-attr]
        # the fused kernel has no complex version, and returns a contiguous weight: a
        # channels_last conv (cuDNN and oneDNN take the input's layout) would convert it in
        # every forward and its gradient in every backward; the formula keeps v's layout
        if formula_only(g, v) or v.is_complex() or _channels_last(v):
            n = norm(v, self.dim)
            return v * (g.reshape(n.shape) / n)  # type: ignore[union-attr]
        w = torch._weight_norm(v, g, dim)  # type: ignore[arg-type]
        if w.grad_fn is not None and dim in (0, v.dim() - 1):
            w.grad_fn.register_hook(_SecondOrder(v, g, dim))  # type: ignore[arg-type]
        return w

    def split(self, w: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.dim
        if _fusable(w, dim):
            # the fused kernel's own norms: g / norm is then exactly 1 and w comes back
            _, n = torch._weight_norm_interface(w, torch.ones_like(norm(w, dim)), dim)
            return n.to(w.dtype).reshape(norm(w, dim).shape), w
        if w.dtype in _LOW:
            return norm(w.float(), dim).to(w.dtype), w
        return norm(w, dim), w


class CenteredWeightNorm(Map):
    r""":math:`w = g\,(v - \bar v)/\lVert v - \bar v\rVert` (Huang et al., ICCV 2017), computed in
    float32 for half-precision parameters."""

    kind = "centered"
    scale_invariant = True

    def direction(self, v: Tensor) -> Tensor:
        axes = _axes(v, self.dim)
        return v - v.mean(dim=axes, keepdim=True) if axes else torch.zeros_like(v)

    length = staticmethod(_norm_here)  # what g is: the centered slice's L2 norm

    def weight(self, g: Tensor | None, v: Tensor) -> Tensor:
        x = v.float() if v.dtype in _LOW else v
        c = self.direction(x)
        w = c * (g.to(c.dtype) / self.length(c, self.dim))  # type: ignore[union-attr]
        return w.to(v.dtype)

    def split(self, w: Tensor) -> tuple[Tensor, Tensor]:
        x = w.float() if w.dtype in _LOW else w
        return self.length(self.direction(x), self.dim).to(w.dtype), w


class WeightStandardization(Map):
    r""":math:`w = (v - \bar v)/\sqrt{\operatorname{var}(v) + \epsilon}` (Qiao et al., 2019); no g."""

    kind = "standardized"
    #: up to eps: rescaling a slice by k moves the weight by k sqrt(var + eps)/sqrt(k^2 var +
    #: eps), which :func:`wnorm.sphere.project_` measures for the radius asked before it
    #: projects (eps=1e-5 on unit rows of a 3x3 conv's 256 inputs: 3%)
    scale_invariant = True
    has_g = False

    def __init__(self, dim: int | None, eps: float = 1e-10) -> None:
        super().__init__(dim)
        self.eps = eps

    def rescaled_change(self, v: Tensor, k: Tensor) -> Tensor:
        """Per slice, the relative change of the weight when that slice of ``v`` is
        multiplied by ``k`` (kept-dim), in float64."""
        x = v.detach().double()
        c = self.direction(x)
        var = (c * c).mean(dim=_axes(x, self.dim), keepdim=True)  # as weight() computes it
        k = k.double()
        return (k * torch.sqrt(var + self.eps) / torch.sqrt(k * k * var + self.eps) - 1).abs()

    def options(self) -> dict[str, object]:
        return {"eps": self.eps}

    direction = CenteredWeightNorm.direction

    def weight(self, g: Tensor | None, v: Tensor) -> Tensor:
        x = v.float() if v.dtype in _LOW else v
        c = self.direction(x)
        var = (c * c).mean(dim=_axes(x, self.dim), keepdim=True)
        return (c * torch.rsqrt(var + self.eps)).to(v.dtype)

    def split(self, w: Tensor) -> tuple[None, Tensor]:
        return None, w


class ForcedWeightNorm(Map):
    r""":math:`w = s\,v/\lVert v\rVert` with :math:`\lVert v\rVert` held at ``radius`` (EDM2,
    Karras et al., 2024); ``s`` is a learned g, or the fixed ``gain``. The map itself is weight
    norm's; holding v on its sphere is :mod:`wnorm.sphere`'s job, after each optimizer step."""

    kind = "forced"
    scale_invariant = True

    def __init__(self, dim: int | None, gain: float | None = None,
                 radius: float | None = None) -> None:
        super().__init__(dim)
        self.gain, self.radius = gain, radius
        self.has_g = gain is None

    def options(self) -> dict[str, object]:
        return {"gain": self.gain, "radius": self.radius}

    def sphere(self, v: Tensor) -> float:
        """The norm every slice of v is held at: ``radius``, by default (EDM2) the square root of
        the slice size, so that entries are of order 1."""
        if self.radius is not None:
            return self.radius
        return (v.numel() // v.shape[self.dim] if self.dim is not None else v.numel()) ** 0.5

    def weight(self, g: Tensor | None, v: Tensor) -> Tensor:
        x = v.float() if v.dtype in _LOW else v
        scale = g.to(x.dtype) if g is not None else self.gain
        return (x * (scale / _norm_here(x, self.dim))).to(v.dtype)  # type: ignore[operator]

    def split(self, w: Tensor) -> tuple[Tensor | None, Tensor]:
        x = w.float() if w.dtype in _LOW else w
        n = norm(x, self.dim)
        v = (x * (self.sphere(w) / n)).to(w.dtype)
        return (n.to(w.dtype) if self.has_g else None), v


class BalancedWeightNorm(CenteredWeightNorm):
    r""":math:`w = g\,(v - \bar v)/\lVert v - \bar v\rVert_1` (balanced normalization of weights,
    Defazio & Bottou, arXiv:1812.04549, as read in :func:`wnorm.balanced_weight_norm`): each slice
    sums to 0 and has L1 norm ``|g|``; computed in float32 for half-precision parameters."""

    kind = "balanced"
    length = staticmethod(l1_norm)  # centered weight norm with the L1 norm
