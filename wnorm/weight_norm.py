r"""The reparameterization :math:`w = g\,v/\lVert v\rVert` for any parameter of any module.

How it works. :func:`weight_norm` removes the parameter ``<name>`` from the module, registers
``<name>_g`` (one entry per output unit, kept-dim shape as in PyTorch's old API) and ``<name>_v``,
and moves the module to a generated subclass of its own class (``isinstance`` still holds, the
class name and ``repr`` are unchanged) whose property ``<name>`` computes the weight:

- with autograd recording, every access computes ``torch._weight_norm(v, g, dim)``: one fused op
  forward and one fused op backward, so gradients reach ``g`` and ``v`` (DDP, hooks and
  ``torch.compile`` see ordinary parameters);
- otherwise (``eval`` under ``no_grad``, inference) the weight is computed once and reused until
  ``g`` or ``v`` changes (keyed on their identity and autograd version counters; ``.to()`` and
  ``train()``/``eval()`` drop it too), so inference costs what a plain layer costs.

Recurrent modules (``nn.RNN``/``nn.LSTM``/``nn.GRU``) keep their weights in a flat list; their
generated class refreshes that list before each forward.

The module pickles, deep-copies and loads with ``torch.load(..., weights_only=False)``; no
non-leaf tensor is stored on it between calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import _extension
from .errors import WnormError

__all__ = [
    "weight_norm",
    "remove_weight_norm",
    "is_weight_normalized",
    "normalized_weights",
    "default_dim",
    "refresh",
]

_DEFAULT = object()  # sentinel: "the output-unit axis of this layer type"


WN, CENTERED, STANDARDIZED, FORCED = "wn", "centered", "standardized", "forced"


class _Spec:
    """What wnorm recorded for one reparameterized parameter, plus the inference cache.

    ``kind``: ``"wn"`` (w = g v/||v||), ``"centered"`` (v centered first), ``"standardized"``
    (w = (v - mean)/std, no g) or ``"forced"`` (v renormalized before each training forward).
    ``gain``: the fixed gain of a forced-normalized weight without a learned g; ``radius``: the
    norm a forced-normalized v is held at (None: the square root of the slice size).
    """

    __slots__ = ("dim", "where", "gname", "vname", "kind", "eps", "gain", "radius",
                 "cache", "g", "v", "gver", "vver", "plain", "owner", "pg", "pv", "pgver", "pvver")

    def __init__(self, pname: str, dim: int | None, where: str, kind: str = WN,
                 eps: float = 0.0, gain: float | None = None,
                 radius: float | None = None) -> None:
        self.dim = dim  # None: one norm for the whole tensor
        self.where = where  # a name for error messages, e.g. "encoder.0 (Conv1d)"
        self.gname = pname + "_g"
        self.vname = pname + "_v"
        self.kind, self.eps, self.gain, self.radius = kind, eps, gain, radius
        self.clear()
        self.release()

    def release(self) -> None:
        """Leave optimizer-side mode (:mod:`wnorm.optim`): autograd computes the weight again."""
        # plain: the leaf weight tensor that forward/backward use while a wnorm.optim optimizer
        # owns this weight (owner: a weakref to it); pg/pv: the parameters it owns (other
        # tensors, e.g. from torch.func.functional_call, go through autograd); pgver/pvver:
        # their versions when the plain weight was last computed (-1: recompute). Not touched by
        # clear(): a train()/eval() switch between backward() and step() must not lose it.
        self.plain: Tensor | None = None
        self.owner: Any = None
        self.pg = self.pv = None
        self.pgver = self.pvver = -1

    def plain_in_sync(self, g: Tensor, v: Tensor) -> bool:
        """Whether the plain weight was computed from ``g`` and ``v`` as they are now."""
        return (self.pg is g and self.pv is v and self.pgver == g._version
                and self.pvver == v._version)

    def mark_synced(self, g: Tensor, v: Tensor) -> None:
        self.pg, self.pv, self.pgver, self.pvver = g, v, g._version, v._version

    def mark_stale(self) -> None:
        """Recompute the plain weight at the next access (data swapped without a version bump)."""
        self.pgver = self.pvver = -1

    @property
    def has_g(self) -> bool:
        return self.kind in (WN, CENTERED) or (self.kind == FORCED and self.gain is None)

    def clear(self) -> None:
        # The cache is valid while g and v are the same tensors at the same versions.
        self.cache: Tensor | None = None
        self.g: Tensor | None = None
        self.v: Tensor | None = None
        self.gver = self.vver = -1

    def __getstate__(self) -> tuple[Any, ...]:
        # the cache is derived: never pickled (a 6-tuple, before radius, still loads)
        return (self.gname[:-2], self.dim, self.where, self.kind, self.eps, self.gain,
                self.radius)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(*state)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Spec:
        return _Spec(*self.__getstate__())


def default_dim(module: nn.Module, name: str = "weight") -> int:
    """The output-unit axis of ``module.<name>``: 1 for ConvTransposeNd weights (stored
    ``(in, out/groups, *k)``), 0 otherwise (Linear, ConvNd, Embedding rows, RNN gate rows)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
        return 1
    return 0


def _describe(module: nn.Module, where: str | None) -> str:
    kind = type(module).__name__
    return f"{where} ({kind})" if where else kind


def _norm(v: Tensor, dim: int | None) -> Tensor:
    """:math:`\\lVert v\\rVert` over every axis but ``dim``, kept-dim (PyTorch's old API shape)."""
    if dim is None:
        return torch.linalg.vector_norm(v)
    axes = [d for d in range(v.dim()) if d != dim]
    return torch.linalg.vector_norm(v, dim=axes, keepdim=True) if axes else v.abs()


_LOW = (torch.float16, torch.bfloat16)


def _compute(v: Tensor, g: Tensor, dim: int | None) -> Tensor:
    # torch._weight_norm fuses the norm and the scaling (forward and backward); dim -1 means
    # "whole tensor" to it, which is why wnorm stores positive dims only. Half-precision
    # parameters are normalized in float32 (a row's sum of squares overflows float16 easily)
    # and the weight is returned in their dtype.
    d = -1 if dim is None else dim
    if v.dtype in _LOW or g.dtype in _LOW:
        return torch._weight_norm(v.float(), g.float(), d).to(v.dtype)
    return torch._weight_norm(v, g, d)


def _torch_weight_norms(module: nn.Module) -> list[tuple[str, str, int | None]]:
    """PyTorch's own weight norm on ``module`` (not its children): ``(name, api, axis)`` per
    normalized parameter, ``api`` "old" (``torch.nn.utils.weight_norm``'s hook) or "new"
    (a ``parametrizations.weight_norm`` chain of one), ``axis`` made non-negative (None: the
    whole tensor, which PyTorch also writes as -1)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: list[tuple[str, str, int | None, int]] = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            found.append((hook.name, "old", hook.dim, module._parameters[hook.name + "_v"].dim()))
    plist = module.__dict__.get("_modules", {}).get("parametrizations")
    if plist is not None:
        for pname, chain in plist.items():
            if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
                found.append((pname, "new", chain[0].dim, chain.original1.dim()))
    return [(pname, api, None if dim is None or dim == -1 else dim % ndim)
            for pname, api, dim, ndim in found]


def _plain_compute(v: Tensor, g: Tensor, dim: int | None, out: Tensor | None = None) -> Tensor:
    """The plain weight of :mod:`wnorm.optim` (``dim`` 0): where its kernel takes the tensors,
    computed with the arithmetic its steps use to write ``w`` (into ``out`` when that fits), so
    that a run resumed from ``g`` and ``v`` continues bit for bit; else :func:`_compute`."""
    kern = _extension.kernels() if dim == 0 else None
    if (kern is not None and v.is_cpu and g.is_cpu and v.dtype in (torch.float32, torch.float64)
            and g.dtype == v.dtype and v.is_contiguous() and g.is_contiguous()
            and g.numel() == v.shape[0] and _extension.readable(v, g)):
        if out is None or not (out.shape == v.shape and out.dtype == v.dtype and out.is_cpu
                               and out.is_contiguous() and _extension.readable(out)):
            out = torch.empty_like(v, memory_format=torch.contiguous_format)
        kern.plain_weight(out, v, g)
        return out
    return _compute(v, g, dim)


def _axes(v: Tensor, dim: int | None) -> list[int]:
    return [d for d in range(v.dim()) if d != dim]


def _centered(v: Tensor, dim: int | None) -> Tensor:
    axes = _axes(v, dim)
    return v - v.mean(dim=axes, keepdim=True) if axes else torch.zeros_like(v)


def _map(spec: _Spec, v: Tensor, g: Tensor | None) -> Tensor:
    """The weight of ``spec``'s kind from its parameters (float32 for half-precision ones)."""
    kind, dim = spec.kind, spec.dim
    if kind == WN:
        return _compute(v, g, dim)  # type: ignore[arg-type]
    low = v.dtype in _LOW
    x = v.float() if low else v
    if kind == CENTERED:
        c = _centered(x, dim)
        w = c * (g.to(c.dtype) / _norm(c, dim))  # type: ignore[union-attr]
    elif kind == STANDARDIZED:
        c = _centered(x, dim)
        var = (c * c).mean(dim=_axes(x, dim), keepdim=True)
        w = c * torch.rsqrt(var + spec.eps)
    else:  # FORCED
        scale = g.to(x.dtype) if g is not None else spec.gain
        w = x * (scale / _norm(x, dim))
    return w.to(v.dtype) if low else w


def _radius(v: Tensor, dim: int | None, radius: float | None) -> float:
    """The norm forced WN holds every slice of v at: ``radius``, by default (EDM2) the square
    root of the slice size, so that entries are of order 1."""
    if radius is not None:
        return radius
    return (v.numel() // v.shape[dim] if dim is not None else v.numel()) ** 0.5


def _renormalize_(v: Tensor, dim: int | None, radius: float | None = None) -> None:
    """Forced WN (EDM2): put every slice of v back on the sphere of :func:`_radius`."""
    with torch.no_grad():
        wide = v.float() if v.dtype in _LOW else v
        v.mul_((_radius(v, dim, radius) / _norm(wide, dim)).to(v.dtype))


def _plain_weight(spec: _Spec, g: Tensor, v: Tensor) -> Tensor | None:
    """Optimizer-side mode: the leaf weight that forward and backward use (None: mode ended)."""
    if spec.owner() is None:  # the optimizer that owned the weight is gone
        spec.release()
        return None
    if spec.pg is not g or spec.pv is not v or not (g.requires_grad and v.requires_grad):
        return None  # not the parameters the optimizer owns, or frozen: autograd handles it
    w = spec.plain
    if spec.pgver == g._version and spec.pvver == v._version:
        return w
    with torch.no_grad():  # g or v changed outside the optimizer (init, load, edit): recompute
        new = _plain_compute(v, g, spec.dim, out=w)  # written into w where the kernel can
        if new is w:
            pass
        elif (new.shape, new.dtype, new.device) == (w.shape, w.dtype, w.device):  # type: ignore[union-attr]
            w.copy_(new)  # type: ignore[union-attr]
        else:
            w = spec.plain = new.requires_grad_(v.requires_grad)
    spec.mark_synced(g, v)
    return w


def _weight(module: nn.Module, spec: _Spec) -> Tensor:
    # The hot path of every weight-normalized layer: keep it short.
    params = module._parameters
    v = params[spec.vname]
    if spec.kind == WN:
        g = params[spec.gname]
        if spec.plain is not None and not (torch.compiler.is_compiling()
                                           or torch._C._is_tracing()):
            w = _plain_weight(spec, g, v)
            if w is not None:
                return w
        if torch.is_grad_enabled() and (g.requires_grad or v.requires_grad):
            return _compute(v, g, spec.dim)  # recorded: gradients reach g and v
    else:
        g = params[spec.gname] if spec.has_g else None
        if torch.is_grad_enabled() and (v.requires_grad or (g is not None and g.requires_grad)):
            if spec.kind == FORCED and module.training:
                _renormalize_(v, spec.dim, spec.radius)
            return _map(spec, v, g)
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return _map(spec, v, g)  # a graph must compute the weight, not capture a constant
    gver = g._version if g is not None else 0
    if spec.g is g and spec.v is v and spec.gver == gver and spec.vver == v._version:
        return spec.cache  # type: ignore[return-value]
    with torch.no_grad():
        w = _map(spec, v, g)
    # one reduction (NaN and inf propagate into the sum), accumulated in float32 at least so
    # that a sum of finite half-precision entries cannot overflow
    if (not math.isfinite(float(w.sum(dtype=torch.promote_types(w.dtype, torch.float32))))
            and not bool(torch.isfinite(w).all())):  # the sum may just overflow
        raise WnormError(
            f"{spec.where}: the weight-normalized '{spec.gname[:-2]}' has non-finite values; "
            f"check '{spec.gname}' and '{spec.vname}' for NaN/inf and '{spec.vname}' for zero rows"
        )
    spec.cache, spec.g, spec.v, spec.gver, spec.vver = w, g, v, gver, v._version
    return w


# --------------------------------------------------------------------------- generated classes
_CLASSES: dict[type, type] = {}


# bound once: the cache hit below runs on every forward of every layer (dynamo recognizes these
# functions by identity, not by name)
_grad_enabled, _is_compiling, _is_tracing = (torch.is_grad_enabled, torch.compiler.is_compiling,
                                             torch._C._is_tracing)


def _wn_property(pname: str) -> property:
    def fget(self: nn.Module) -> Tensor:
        spec = self.__dict__["_wn"].get(pname)
        if spec is None:  # another instance of this class normalizes pname, this one does not
            return nn.Module.__getattr__(self, pname)
        w = spec.cache
        # Inlined hot path of _weight: a weight-normalized layer without grad (eval/inference)
        # reusing its cached weight, valid while g and v are the same tensors at the same
        # versions. In Python every step of it shows at batch 1; the rest is in _weight.
        if (w is not None and spec.plain is None and not _grad_enabled()
                and not (_is_compiling() or _is_tracing())):
            params = self._parameters
            g, v = params.get(spec.gname), params[spec.vname]
            if (spec.g is g and spec.v is v and spec.vver == v._version
                    and spec.gver == (0 if g is None else g._version)):
                return w
        return _weight(self, spec)

    def fset(self: nn.Module, value: Any) -> None:
        if pname in self.__dict__["_wn"]:
            raise WnormError(
                f"{self.__dict__['_wn'][pname].where}: '{pname}' is weight-normalized and "
                f"computed from '{pname}_g' and '{pname}_v'; assign those, or call "
                f"wnorm.remove_weight_norm(module, {pname!r}) first"
            )
        self.__dict__[pname] = value

    return property(fget, fset, doc=f"``{pname}`` computed as g * v / ||v||")


def _setattr(self: nn.Module, name: str, value: Any) -> None:
    # nn.Module.__setattr__ registers Parameters itself (the property's setter never runs):
    # refuse them here for a normalized name, with the same message.
    if isinstance(value, nn.Parameter) and name in self.__dict__.get("_wn", ()):
        type(self).__dict__[name].fset(self, value)
    type(self)._wn_base.__setattr__(self, name, value)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # The generated class is not importable by name: rebuild it from the original class.
    return (_rebuild, (type(self)._wn_base, self.__getstate__()))


def _rebuild(base: type, state: dict[str, Any]) -> nn.Module:
    cls = _wn_class(base)
    for pname in state.get("_wn", {}):
        _ensure_property(cls, pname)
    module = cls.__new__(cls)
    module.__setstate__(state)
    _refresh_flat_weights(module)
    return module


def _refresh_flat_weights(module: nn.Module) -> None:
    # RNNs read their weights from a flat list; fill it without recording a graph so that the
    # module never holds a non-leaf tensor (which would break deepcopy).
    if isinstance(module, nn.RNNBase):
        with torch.no_grad():
            module._init_flat_weights()
        module._flat_weight_refs = [None] * len(module._flat_weights)


def _extra_repr(self: nn.Module) -> str:
    base = type(self)._wn_base.extra_repr(self)
    wn = ", ".join(f"{p}: dim={s.dim}" + ("" if s.kind == WN else f", {s.kind}")
                   for p, s in self.__dict__["_wn"].items())
    return f"{base}, weight_norm=({wn})" if base else f"weight_norm=({wn})"


def _train(self: nn.Module, mode: bool = True) -> nn.Module:
    for spec in self.__dict__["_wn"].values():
        spec.clear()  # a mode switch is a cheap, safe point to drop the cache
    return type(self)._wn_base.train(self, mode)


def _apply_fn(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    # .to()/.half()/.cuda() swap parameter data but keep version counters: drop the cache.
    params = self._parameters
    before = {}
    for name, spec in self.__dict__["_wn"].items():
        spec.clear()
        if spec.plain is not None:
            before[name] = [_where(params.get(n)) for n in (spec.gname, spec.vname)]
    out = type(self)._wn_base._apply(self, fn, *args, **kwargs)
    for name, was in before.items():  # optimizer-side mode: recompute only if data moved
        spec = self.__dict__["_wn"][name]
        if [_where(params.get(n)) for n in (spec.gname, spec.vname)] != was:
            spec.mark_stale()
    return out


def _where(t: Tensor | None) -> tuple[Any, ...]:
    return (None,) if t is None else (t.data_ptr(), t.dtype, t.device, t.shape)


def _rnn_forward(self: nn.RNNBase, *args: Any, **kwargs: Any) -> Any:
    # RNNs run on the list self._flat_weights: fill it with the normalized weights (computed
    # once per call, with the graph to g and v when recording), run, then keep detached copies
    # so that the module never holds a non-leaf tensor between calls (deepcopy needs that).
    specs = self.__dict__["_wn"]
    params = self._parameters
    names = self._flat_weights_names
    self.__dict__["_flat_weights"] = [
        _weight(self, specs[n]) if n in specs else params.get(n) for n in names
    ]
    try:
        return type(self)._wn_base.forward(self, *args, **kwargs)
    finally:
        self.__dict__["_flat_weights"] = [
            None if t is None else t.detach() for t in self.__dict__["_flat_weights"]
        ]


def _rnn_weights_have_changed(self: nn.RNNBase) -> bool:
    return False  # the generated forward refreshes the flat weights itself, every call


def _rnn_init_flat_weights(self: nn.RNNBase) -> None:
    with torch.no_grad():  # see _rnn_forward: no graph kept on the module
        type(self)._wn_base._init_flat_weights(self)


def _wn_class(base: type) -> type:
    if "_wn_base" in base.__dict__:
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        ns: dict[str, Any] = {
            "_wn_base": base,
            "__reduce_ex__": _reduce_ex,
            "__setattr__": _setattr,
            "extra_repr": _extra_repr,
            "train": _train,
            "_apply": _apply_fn,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        if issubclass(base, nn.RNNBase):
            ns["forward"] = _rnn_forward
            ns["_weights_have_changed"] = _rnn_weights_have_changed
            ns["_init_flat_weights"] = _rnn_init_flat_weights
        cls = type(base.__name__, (base,), ns)
        _CLASSES[base] = cls
    return cls


def _ensure_property(cls: type, pname: str) -> None:
    if not isinstance(cls.__dict__.get(pname), property):
        setattr(cls, pname, _wn_property(pname))


# --------------------------------------------------------------------------- public functions
def is_weight_normalized(module: nn.Module, name: str | None = None) -> bool:
    """Whether wnorm normalizes ``module.<name>`` (any parameter of it when ``name`` is None)."""
    specs = module.__dict__.get("_wn")
    if not specs:
        return False
    return True if name is None else name in specs


def normalized_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, int | None]]:
    """Yield ``(module_name, module, param_name, dim)`` for every weight wnorm normalizes."""
    for mname, module in model.named_modules():
        for pname, spec in module.__dict__.get("_wn", {}).items():
            yield mname, module, pname, spec.dim


def weight_norm(
    module: nn.Module, name: str = "weight", dim: int | None | object = _DEFAULT, *, where: str = ""
) -> nn.Module:
    r"""Reparameterize ``module.<name>`` as :math:`w = g\,\frac{v}{\lVert v\rVert}`, one g per output unit.

    The norm runs over every axis except ``dim``, so :math:`\lVert w\rVert = g` for each slice
    along ``dim`` whatever ``v`` is (Salimans & Kingma, 2016, eq. 2,
    https://arxiv.org/abs/1602.07868). ``<name>`` leaves the parameters; ``<name>_g`` (kept-dim
    shape, e.g. ``(out, 1, 1, 1)`` for a Conv2d) and ``<name>_v`` (the weight's shape) join them,
    starting at ``g = ||w||``, ``v = w`` so the module computes exactly what it did before.
    ``module.<name>`` stays readable and is the computed weight.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``; for RNNs e.g. ``"weight_hh_l0"``).
        dim: the output-unit axis, one g per slice along it. Default: 0 for Linear, ConvNd,
            Embedding and RNN weights, 1 for ConvTransposeNd (weight ``(in, out, *k)``).
            ``None``: one norm, and one scalar g, for the whole tensor. Negative values are
            refused (an error): PyTorch reads ``dim=-1`` as "whole tensor", Python as "last
            axis", so either reading would silently surprise someone.
        where: a name for the module in error messages (``wnorm.apply`` passes its path).

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: ``name`` is not a parameter of ``module``, is already weight-normalized
            (by wnorm or PyTorch), is not initialized yet (a lazy module before its first
            forward), ``dim`` is out of range, or the weight has non-finite values or
            zero-norm slices.

    Tied weights: this function sees one module. If ``module.<name>`` is a Parameter that
    another module holds too, only this module is reparameterized: the other keeps the old
    Parameter as a plain weight and the two are no longer tied. To keep a tie, call
    :func:`wnorm.apply` on the model that holds both (it gives every holder the same ``g`` and
    ``v``, or raises), or tie by hand: ``weight_norm(a); weight_norm(b);
    b.weight_g, b.weight_v = a.weight_g, a.weight_v``.

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.weight_norm(torch.nn.Linear(3, 4))
        >>> sorted(n for n, _ in layer.named_parameters())
        ['bias', 'weight_g', 'weight_v']
        >>> torch.allclose(layer.weight.norm(dim=1), layer.weight_g.squeeze(1))
        True
    """
    return _reparameterize(module, name, dim, WN, where=where)


def _reparameterize(
    module: nn.Module,
    name: str,
    dim: int | None | object,
    kind: str,
    *,
    where: str = "",
    eps: float = 0.0,
    gain: float | None = None,
    radius: float | None = None,
) -> nn.Module:
    """Check, then replace ``module.<name>`` by ``<name>_g``/``<name>_v`` of ``kind``."""
    if not isinstance(module, nn.Module):
        raise WnormError(f"wnorm expects an nn.Module; got {type(module).__name__}")
    label = _describe(module, where)
    specs = module.__dict__.get("_wn", {})
    if name in specs:
        raise WnormError(f"{label}: '{name}' is already weight-normalized by wnorm")
    if name in getattr(module, "parametrizations", {}):
        raise WnormError(
            f"{label}: '{name}' already has a PyTorch parametrization "
            "(torch.nn.utils.parametrizations); remove it before applying wnorm"
        )
    if (name + "_g") in module._parameters or (name + "_v") in module._parameters:
        raise WnormError(
            f"{label}: '{name}' is already weight-normalized (it has '{name}_g'/'{name}_v', "
            "e.g. from torch.nn.utils.weight_norm); call torch.nn.utils.remove_weight_norm first"
        )
    weight = module._parameters.get(name)
    if weight is None:
        have = [n for n, p in module._parameters.items() if p is not None]
        raise WnormError(
            f"{label}: no parameter named '{name}' to weight-normalize; "
            f"its parameters are {have}"
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise WnormError(
            f"{label}: '{name}' is not initialized yet (a lazy module materializes it at its "
            "first forward); run one forward pass on a batch before weight-normalizing it"
        )
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
        raise WnormError(
            f"{label}: sparse=True gives '{name}' a sparse gradient, and the gradients of g and "
            "v (eqs. 3-4) need every row's dot product with it densely (PyTorch's backward "
            "fails on it); build the embedding with sparse=False to weight-normalize it"
        )
    ndim = weight.dim()
    if dim is _DEFAULT:
        dim = default_dim(module, name)
    if dim is not None:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise WnormError(f"{label}: dim must be an int or None; got {dim!r}")
        if dim < 0:
            raise WnormError(
                f"{label}: dim {dim} is ambiguous: PyTorch's weight_norm reads dim=-1 as 'the "
                "whole tensor', Python indexing as 'the last axis'; pass dim=None for one norm "
                f"over the whole tensor, or an axis 0..{ndim - 1}"
            )
        if ndim == 0 or dim >= ndim:
            raise WnormError(
                f"{label}: dim {dim} is out of range for '{name}' of shape {tuple(weight.shape)} "
                f"(expected None or 0 <= dim < {ndim})"
            )
    with torch.no_grad():
        w = weight.detach()
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise WnormError(f"{label}: '{name}' has {bad} non-finite values (NaN or inf)")
        wide = w.float() if w.dtype in _LOW else w  # fp16 sums of squares overflow
        direction = _centered(wide, dim) if kind in (CENTERED, STANDARDIZED) else wide
        norm = _norm(direction, dim)
        if not bool(torch.isfinite(norm).all()) or not bool(torch.isfinite(norm.to(w.dtype)).all()):
            raise WnormError(
                f"{label}: the norms of '{name}' overflow {w.dtype} (largest |entry| "
                f"{float(w.abs().max()):.3g}); rescale the weight or use a wider dtype"
            )
        zero = (norm == 0).flatten().nonzero().flatten().tolist()
        if zero:
            where_txt = "" if dim is None else f" along dim {dim}"
            what = "zero norm" if kind in (WN, FORCED) else "zero norm after centering (constant)"
            pad = getattr(module, "padding_idx", None)
            hint = ""
            if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and pad is not None
                    and dim == 0 and pad in zero):
                hint = (f"; row {pad} is the padding_idx row, which nn.Embedding sets to zeros "
                        "and never trains: leave this embedding unnormalized (exclude it), or "
                        "build it without padding_idx")
            raise WnormError(
                f"{label}: {len(zero)} of {norm.numel()} slices{where_txt} of '{name}' have "
                f"{what} (indices {zero[:10]}{'...' if len(zero) > 10 else ''}); weight "
                "normalization needs a direction for every output unit" + hint
            )
        g = norm.to(w.dtype)
        v = w
        if kind == FORCED:
            v = (wide * (_radius(w, dim, radius) / norm)).to(w.dtype)
    spec = _Spec(name, dim, label, kind, eps, gain, radius)
    req = weight.requires_grad
    del module._parameters[name]
    if spec.has_g:
        module.register_parameter(name + "_g", nn.Parameter(g, requires_grad=req))
    module.register_parameter(name + "_v", nn.Parameter(v, requires_grad=req))
    cls = _wn_class(type(module))
    _ensure_property(cls, name)
    if "_wn" not in module.__dict__:
        object.__setattr__(module, "_wn", {})
    module.__dict__["_wn"][name] = spec
    module.__class__ = cls
    _refresh_flat_weights(module)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    r"""Undo :func:`weight_norm` (or any wnorm reparameterization): ``module.<name>`` becomes a
    plain parameter holding the computed weight, e.g. :math:`g\,v/\lVert v\rVert`;
    ``<name>_g`` and ``<name>_v`` go away. When no weight of the
    module stays normalized, the module gets its original class back.

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: ``module.<name>`` is not weight-normalized by wnorm.
    """
    specs = module.__dict__.get("_wn", {})
    if name not in specs:
        raise WnormError(f"{_describe(module, '')}: '{name}' is not weight-normalized by wnorm")
    spec = specs[name]
    g = module._parameters[spec.gname] if spec.has_g else None
    v = module._parameters[spec.vname]
    with torch.no_grad():
        w = _map(spec, v, g).detach().clone()
    req = v.requires_grad
    del specs[name]
    module._parameters.pop(spec.gname, None)
    del module._parameters[spec.vname]
    module._parameters[name] = nn.Parameter(w, requires_grad=req)
    if not specs:
        base = type(module)._wn_base
        del module.__dict__["_wn"]
        module.__class__ = base
    _refresh_flat_weights(module)
    return module


def refresh(model: nn.Module) -> nn.Module:
    """Drop every cached inference weight in ``model``.

    Needed only after editing ``g`` or ``v`` through ``.data`` (which hides the change from the
    version counters); optimizers, ``load_state_dict``, ``train()``/``eval()`` and in-place
    edits under ``torch.no_grad()`` are tracked already.
    """
    for _, module, pname, _ in normalized_weights(model):
        spec = module.__dict__["_wn"][pname]
        spec.clear()
        spec.mark_stale()  # wnorm.optim's plain weight too
    return model
