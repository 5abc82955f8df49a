r"""Training on the hypersphere: after each optimizer step, put weight slices back on a sphere.

.. math::
    v_i \leftarrow r_i\,\frac{v_i}{\lVert v_i\rVert}\qquad\text{for every slice } v_i
    \text{ along the output-unit axis}

The common core of nGPT (Loshchilov et al., 2024: rows normalized after every step, learned
scales elsewhere), SimbaV2 (Lee et al., 2025: unit-norm rows after each update), EDM2's forced
weight normalization (Karras et al., 2024: :func:`wnorm.forced_weight_norm`, v held at
:math:`\sqrt{n}`) and NaP (Lyle et al., 2024: each row held at its starting norm). Where the
weight is reparameterized by wnorm the slices of ``v`` are projected, which leaves the weight as
it is (every wnorm map is invariant to a positive rescaling of a slice of v; weight
standardization up to its eps, so a radius at which eps is not small against the slices'
variance is refused) and holds :math:`\lVert v\rVert` fixed, so the effective learning rate of
the direction no longer decays as :math:`\lVert v\rVert` grows (Salimans & Kingma 2016, section
2.1); a plain weight is projected itself.

The projection runs as a step post-hook of the optimizer, so it works with any
``torch.optim`` optimizer (fused and foreach ones included), under DDP (parameters are plain
tensors, identical on every rank after the step) and under FSDP2 when each rank holds whole
slices (``fully_shard``'s ``Shard(0)`` with output units along dim 0): a slice norm is then local.
It does no host sync (no ``.item()``): a slice of norm 0 is left as it is. The checks that need
one (zero slices, a radius the dtype cannot hold) run once, at registration.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._held import flush_all
from ._slot import slots_of
from .apply import NORM_TYPES, _excluded, _included, default_types
from .errors import WnormError, expect_module, finite_positive
from .maps import ForcedWeightNorm, WeightStandardization, norm
from .weight_norm import DEFAULT, default_dim

__all__ = ["RADII", "project_", "project_after_step", "Projection", "is_projected"]

#: The radius modes besides a positive number: ``"unit"`` (norm 1, nGPT and SimbaV2),
#: ``"sqrt_fan_in"`` (:math:`\sqrt{n}`, n = the slice size, so entries are of order 1; EDM2) and
#: ``"initial"`` (each slice's norm when the projection is registered, NaP).
RADII = ("unit", "sqrt_fan_in", "initial")

_LOW = (torch.float16, torch.bfloat16)

# (module, parameter name) -> the live projections holding it, for is_projected
_COVERED: weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.WeakSet[Projection]]] = \
    weakref.WeakKeyDictionary()


class _Target:
    """One tensor to project: its slices along ``dim``, onto ``radius`` (a number, or per-slice
    kept-dim norms for ``"initial"``), and every ``(module, parameter name)`` holding it."""

    __slots__ = ("name", "param", "dim", "radius", "holders")

    def __init__(self, name: str, param: Tensor, dim: int | None, radius: Any,
                 holder: tuple[nn.Module, str]) -> None:
        self.name, self.param, self.dim, self.radius = name, param, dim, radius
        self.holders = [holder]


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: _Target) -> Tensor:
    """The part of the tensor this process holds, refusing shardings that split a slice: its
    norm would need a reduction across ranks."""
    p = t.param
    if not _is_dtensor(p):
        return p
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    for pl in placements:
        if pl.is_partial() or (pl.is_shard() and (t.dim is None or pl.dim != t.dim)):
            raise WnormError(
                f"{t.name}: a DTensor placed {placements}; its slices along {_along(t.dim)} "
                "are split across ranks, and their norms would need a reduction that wnorm "
                "does not do. Supported: shards along the output-unit axis (FSDP2's Shard(0) "
                "for output units along dim 0: Linear, ConvNd, Embedding) and replicated "
                "tensors; leave this weight out (exclude=...) or shard it along its units")
    return p.to_local()  # type: ignore[attr-defined]


def _land_writes(t: _Target) -> None:
    """A write into a held weight of ``t``'s layers lands in g and v before v is projected:
    after, it would land over the projection (rows off the sphere, and a warning that g and v
    were changed)."""
    for module, _ in t.holders:
        flush_all(module)


def _scale(t: _Target, wide: Tensor) -> Tensor:
    """``radius / norm`` of every slice of ``wide`` (float32 for a float16/bfloat16 tensor)."""
    n = norm(wide, t.dim)
    # no host sync: a zero slice (no direction) keeps its values instead of becoming NaN
    return torch.where(n > 0, t.radius / n, torch.ones_like(n))


def _project(t: _Target) -> None:
    local = _local(t)
    if local.numel() == 0:  # an FSDP2 shard with no row: nothing to project on this rank
        return
    if local.dtype in _LOW:
        wide = local.float()
        # multiplied in float32 and rounded once: a scale rounded to float16 overflows (radius
        # 5e4 on rows of norm 0.5) where every projected entry fits
        torch.mul(wide, _scale(t, wide), out=local)
    else:
        local.mul_(_scale(t, local))


class Projection:
    """The weights :func:`project_after_step` holds on their spheres, after every step of one
    optimizer. Call it to project now; :meth:`remove` stops it."""

    def __init__(self, targets: list[_Target]) -> None:
        self._targets = targets
        self._handle: Any = None
        for t in targets:
            for module, pname in t.holders:
                _COVERED.setdefault(module, {}).setdefault(pname, weakref.WeakSet()).add(self)

    @property
    def names(self) -> list[str]:
        """``<module path>.<parameter>`` of every projected tensor (one per tie)."""
        return [t.name for t in self._targets]

    def __call__(self) -> None:
        with torch.no_grad():
            for t in self._targets:
                _land_writes(t)
                _project(t)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self()

    def _live(self) -> bool:
        """Registered, not removed, and its optimizer still exists: the hook keeps only a weak
        reference to the optimizer's hook dict, so a projection the user's variable keeps
        alive after the optimizer was dropped (a second training stage with a new one)
        projects nothing after steps."""
        if self._handle is None:
            return False
        hooks = self._handle.hooks_dict_ref()
        return hooks is not None and self._handle.id in hooks

    def remove(self) -> None:
        """Unregister the hook; the weights are no longer projected after steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for t in self._targets:
            for module, pname in t.holders:
                live = _COVERED.get(module, {}).get(pname)
                if live is not None:
                    live.discard(self)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
        return f"Projection({len(self._targets)} tensors: {shown})"


def _holding(module: nn.Module, name: str) -> list[tuple[Projection, _Target]]:
    """The live projections holding ``module.<name>``, each with its target for it."""
    return [(p, t) for p in list(_COVERED.get(module, {}).get(name, ())) if p._live()
            for t in p._targets if any(m is module and n == name for m, n in t.holders)]


def is_projected(module: nn.Module, name: str) -> bool:
    """Whether a live :func:`project_after_step` holds ``module.<name>`` (a parameter name, e.g.
    ``"weight_v"``) on its sphere: one not removed whose optimizer still exists.

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.forced_weight_norm(torch.nn.Linear(4, 3))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> proj = wnorm.project_after_step(opt, layer)
        >>> wnorm.is_projected(layer, "weight_v")
        True
        >>> proj.remove()  # or drop the optimizer (a new one for a second stage)
        >>> wnorm.is_projected(layer, "weight_v")
        False
    """
    # liveness only: a forced layer asks this at every forward (a scan of every projection's
    # targets made deep models' steps quadratic)
    live = _COVERED.get(module, {}).get(name, ())
    if not live and not (isinstance(module, nn.Module) and name in module._parameters):
        # a typo ("wieght_v") or a container read as "not projected"
        have = list(module._parameters) if isinstance(module, nn.Module) else []
        raise WnormError(f"is_projected: {type(module).__name__} has no parameter named "
                         f"{name!r} of its own; its parameters are {have}")
    return any(p._live() for p in live)


# --------------------------------------------------------------------------- selection
def _patterns(arg: Any, what: str, types_ok: bool) -> list[Any]:
    if arg is None:
        return []
    items = [arg] if isinstance(arg, (str, type)) else list(arg)
    for e in items:
        if not (isinstance(e, str) or (types_ok and isinstance(e, type)
                                       and issubclass(e, nn.Module))):
            raise WnormError(f"{what}: expected glob patterns (str)"
                             f"{' or module types' if types_ok else ''}; got {e!r}")
    return items


def _check_radius(fn: str, radius: Any) -> Any:
    if radius is None or (isinstance(radius, str) and radius in RADII):
        return radius
    # a 0-d tensor read once, at registration (a host sync there, never after a step)
    x = finite_positive(radius.item() if isinstance(radius, Tensor) and radius.dim() == 0
                        else radius)
    if x is None:
        got = repr(radius) if isinstance(radius, (str, int, float, Tensor)) else \
            type(radius).__name__  # a model's repr would fill the screen
        raise WnormError(f"{fn}: radius must be None, one of {list(RADII)} or a finite number "
                         f"> 0; got {got}")
    return x


def _plain_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")
                and module._parameters.get(n) is not None]
    if isinstance(module, nn.RNNCellBase):
        return [n for n in ("weight_ih", "weight_hh") if module._parameters.get(n) is not None]
    p = module._parameters.get("weight")
    return ["weight"] if p is not None and p.dim() >= 1 else []


def _plain_dim(fn: str, label: str, module: nn.Module, pname: str, p: Tensor, dim: Any) -> Any:
    d = default_dim(module, pname) if dim is DEFAULT else dim
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < p.dim()):
        raise WnormError(f"{fn}: {label}: dim must be None or an axis 0..{p.dim() - 1} of "
                         f"'{pname}' of shape {tuple(p.shape)}; got {d!r}")
    return d


def _select(fn: str, model: nn.Module, radius: Any, types: Any, include: Any, exclude: Any,
            dim: Any) -> list[_Target]:
    expect_module(fn, model)
    types = default_types() if types is None else (
        (types,) if isinstance(types, type) else tuple(types))
    inc = _patterns(include, f"{fn}: include", False) if include is not None else None
    # apply's rule: an excluded module's children are excluded too, and a typo is an error
    excluded = _excluded(model, _patterns(exclude, f"{fn}: exclude", True), fn)
    included = _included(model, inc, fn) if inc is not None else None
    found: dict[int, _Target] = {}
    order: list[_Target] = []

    def add(label: str, module: nn.Module, pname: str, dim_: Any, r: Any) -> None:
        p = module._parameters[pname]
        name = f"{label}.{pname}" if label else pname
        t = found.get(id(p))
        if t is None:
            found[id(p)] = t = _Target(name, p, dim_, r, (module, pname))
            order.append(t)
            return
        if t.dim != dim_ or t.radius != r:
            raise WnormError(f"{fn}: {name} is the same Parameter as {t.name}, but they are "
                             f"projected differently (dim {dim_} vs {t.dim}, radius {r!r} vs "
                             f"{t.radius!r}); exclude one of them or untie them")
        t.holders.append((module, pname))

    for mname, module in model.named_modules():
        if id(module) in excluded:
            continue
        if included is not None and id(module) not in included:
            continue
        slots = slots_of(module)
        for pname, s in slots.items():
            if isinstance(s.map, ForcedWeightNorm):  # held on its own sphere, whatever radius
                v = module._parameters[s.vname]
                add(mname, module, s.vname, s.map.dim, s.map.sphere(v))
            elif radius is not None:
                if not s.map.scale_invariant:
                    raise WnormError(
                        f"{fn}: {mname or '<model>'}: '{pname}' is reparameterized by "
                        f"{s.map!r}, whose weight changes when slices of '{s.vname}' are "
                        "rescaled; exclude this module")
                add(mname, module, s.vname, s.map.dim, radius)
        if radius is None or not isinstance(module, types) or isinstance(module, NORM_TYPES):
            continue
        for pname in _plain_names(module):
            if pname in slots:
                continue
            p = module._parameters[pname]
            add(mname, module, pname,
                _plain_dim(fn, mname or "<model>", module, pname, p, dim), radius)
    return order


def _resolve(fn: str, targets: list[_Target]) -> None:
    """Turn radius modes into numbers (or per-slice norms), refusing zero slices: a slice with
    no direction cannot be put on a sphere. A host sync, once, at registration; for a sharded
    tensor, one all-reduce too, so that every rank refuses what one rank's shard refuses."""
    with torch.no_grad():
        for t in targets:
            local = _local(t)
            try:
                _resolve_one(fn, t, local)
                failed = None
            except WnormError as e:
                if not _is_dtensor(t.param):
                    raise
                failed = e
            if _is_dtensor(t.param):
                _agree(fn, t, local, failed)


def _agree(fn: str, t: _Target, local: Tensor, failed: WnormError | None) -> None:
    """Raise on every rank when one rank's shard was refused: a rank raising alone would leave
    the others waiting in their next collective for good."""
    import torch.distributed as dist

    shard_dims = [i for i, pl in enumerate(t.param.placements)  # type: ignore[attr-defined]
                  if pl.is_shard()]
    if not shard_dims:
        if failed is not None:
            raise failed
        return  # replicated: every rank checked the same values
    flag = torch.tensor([0 if failed is None else 1], device=local.device)
    for i in shard_dims:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX,
                        group=t.param.device_mesh.get_group(i))  # type: ignore[attr-defined]
    if failed is not None:
        raise WnormError(f"{failed} (on this rank's shard: indices within it; every rank "
                         "refuses)") from None
    if bool(flag.item()):
        raise WnormError(f"{fn}: {t.name}: another rank's shard of it was refused (its error "
                         "says why); nothing was registered")


def _resolve_one(fn: str, t: _Target, local: Tensor) -> None:
    if t.radius == "unit":
        t.radius = 1.0
    elif t.radius == "sqrt_fan_in":
        p = t.param
        t.radius = math.sqrt(p.numel() // (p.shape[t.dim] if t.dim is not None else 1))
    if local.numel() == 0:  # an FSDP2 shard with no row (fewer units than ranks)
        if t.radius == "initial":
            t.radius = local.new_empty(0)  # nothing here to hold
        return
    n = norm(local.float() if local.dtype in _LOW else local, t.dim)
    zero = (n == 0).flatten().nonzero().flatten().tolist()
    if zero:
        raise WnormError(
            f"{fn}: {t.name}: {len(zero)} of {n.numel()} slices have norm 0 (indices "
            f"{zero[:10]}{'...' if len(zero) > 10 else ''}); a slice needs a direction "
            "to be put on a sphere (an Embedding's padding_idx row is all zeros: "
            "exclude that module)")
    if t.radius == "initial":
        t.radius = n.clone()
    _check_fits(fn, t, local)
    _check_standardized(fn, t, local, n)


def _map_of(t: _Target) -> Any:
    """The wnorm map whose v ``t`` is, or None for a plain weight."""
    module, pname = t.holders[0]
    return next((s.map for s in slots_of(module).values() if s.vname == pname), None)


def _radius_text(radius: Any) -> str:
    return "'initial' (each slice's norm at registration)" if isinstance(radius, Tensor) \
        else f"{radius:g}"


def _along(dim: int | None) -> str:
    return "the whole tensor" if dim is None else f"dim {dim}"


def _check_fits(fn: str, t: _Target, local: Tensor) -> None:
    """Refuse a radius the tensor's dtype cannot hold: projected, an entry would overflow to inf
    (float16 past 65504) or a slice would round to all zeros (no direction: a wnorm layer's
    weight would be NaN). Computed as the projection computes it; a host sync, once."""
    wide = local.float() if local.dtype in _LOW else local
    projected = (wide * _scale(t, wide)).to(local.dtype)
    m = _map_of(t)
    back = projected.to(wide.dtype)
    n = norm(m.direction(back) if m is not None else back, t.dim)
    inf, zero = torch.stack([(~torch.isfinite(projected)).sum(), (n == 0).sum()]).tolist()
    if not (inf or zero):
        return
    what = (f"{inf} of its {projected.numel()} entries would overflow to inf (the largest "
            f"{local.dtype} is {torch.finfo(local.dtype).max:g})" if inf else
            f"{zero} of its {n.numel()} slices would round to all zeros (no direction left"
            + (": its weight would be NaN)" if m is not None else ")"))
    raise WnormError(
        f"{fn}: {t.name} ({type(t.holders[0][0]).__name__}, {local.dtype}): on spheres of "
        f"radius {_radius_text(t.radius)}, {what}; use a radius {local.dtype} can hold at this "
        "slice size, or keep this weight in float32 (or exclude it)")


#: the largest relative change of a weight-standardized weight that projecting may make
_WS_TOLERANCE = 1e-6


def _check_standardized(fn: str, t: _Target, local: Tensor, n: Tensor) -> None:
    """Refuse to project a weight standardization's v onto a sphere where its eps is not
    small against the slices' variance: (v - mean)/sqrt(var + eps) then changes (by 36% at the
    default eps for a radius of 1e-4; by 3% at eps=1e-5 on unit rows)."""
    ws = _map_of(t)
    if not isinstance(ws, WeightStandardization):
        return
    r = t.radius if isinstance(t.radius, Tensor) else torch.tensor(float(t.radius))
    change = float(ws.rescaled_change(local, r.double().to(n.device) / n.double()).max())
    if change > _WS_TOLERANCE:
        raise WnormError(
            f"{fn}: {t.name}: putting the slices of this weight standardization's v (eps="
            f"{ws.eps:g}) on spheres of radius {_radius_text(t.radius)} would change its "
            f"weight by up to {change:.2g} (relative): eps is not small against the slices' "
            "variance there; use a larger radius ('sqrt_fan_in'), a smaller eps, or exclude "
            "this module")


def _same_sphere(a: _Target, b: _Target) -> bool:
    """Whether two targets hold one tensor on the same spheres: the same dim and radii (per
    slice for ``"initial"``, equal up to the rounding of the tensor's dtype)."""
    if a.dim != b.dim:
        return False
    if not (isinstance(a.radius, Tensor) or isinstance(b.radius, Tensor)):
        return math.isclose(a.radius, b.radius, rel_tol=1e-9)
    device = (a.radius if isinstance(a.radius, Tensor) else b.radius).device
    ra, rb = (torch.as_tensor(r, dtype=torch.float64, device=device) for r in (a.radius, b.radius))
    rtol = max(1e-6, 8 * torch.finfo(a.param.dtype).eps)
    return bool(torch.allclose(ra, rb, rtol=rtol, atol=0.0))  # a host sync, at registration


def _check_not_held(fn: str, optimizer: torch.optim.Optimizer, targets: list[_Target]) -> None:
    """Refuse to hold a tensor on other spheres than a live projection holds it on: both hooks
    would run after each step and the one registered last would win without a word. The same
    spheres again is allowed (the second projection is redundant, not wrong)."""
    collected = False
    for t in targets:
        for module, pname in t.holders:
            for other, o in _holding(module, pname):
                if _same_sphere(o, t):
                    continue
                if not collected:
                    # an optimizer the user dropped may wait in a reference cycle (an LR
                    # scheduler's) for the collector: its projection is gone, not live
                    gc.collect()
                    collected = True
                if not other._live():
                    continue
                where = ("this optimizer" if other._handle.hooks_dict_ref()
                         is getattr(optimizer, "_optimizer_step_post_hooks", None)
                         else "another optimizer, still alive")
                raise WnormError(
                    f"{fn}: {t.name} is already held by a live projection on {where} "
                    f"({other!r}) at radius {_radius_text(o.radius)} along {_along(o.dim)}; this "
                    f"one would hold it at radius {_radius_text(t.radius)} along "
                    f"{_along(t.dim)}, and the one registered last would win after every step. "
                    "Call .remove() on the other projection first, or exclude this weight from "
                    "one of them")


def _nothing(fn: str, model: nn.Module) -> WnormError:
    return WnormError(
        f"{fn}: {type(model).__name__} has no forced_weight_norm layer, and radius=None "
        f"projects only those; pass radius= (one of {list(RADII)} or a number) to project its "
        "other weights")


def project_(
    model: nn.Module,
    radius: str | float | Tensor | None = None,
    *,
    types: Iterable[type[nn.Module]] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | type[nn.Module] | Iterable[str | type[nn.Module]] = (),
    dim: int | None | object = DEFAULT,
) -> nn.Module:
    r"""Project, in place and once, the chosen weights of ``model`` onto their spheres:
    :math:`v_i \leftarrow r\,v_i/\lVert v_i\rVert` for every slice along the output-unit axis.

    Selected: the ``v`` of every :func:`wnorm.forced_weight_norm` layer (onto its own sphere,
    whatever ``radius`` says), and, when ``radius`` is given, the ``v`` of every other wnorm
    layer and the weight of every plain layer of ``types`` (normalization layers never), subject
    to ``include``/``exclude`` as in :func:`wnorm.apply`. Projecting a wnorm layer's ``v`` leaves
    its weight as it is; projecting a plain weight changes it.

    Args:
        model: the model, changed in place.
        radius: ``None`` (default: forced layers only), ``"unit"``, ``"sqrt_fan_in"`` or a
            number > 0 (a 0-d tensor is read once). (``"initial"`` needs a start to remember:
            :func:`project_after_step`.)
        types: the plain layer types (default: those of :func:`wnorm.apply`).
        include: glob patterns on module names; when given, only matching modules.
        exclude: glob patterns on module names, or module types, to leave alone.
        dim: the slice axis of plain weights (default: each layer type's output-unit axis, as
            :func:`wnorm.weight_norm`'s; ``None``: the whole tensor). A wnorm layer's ``v`` is
            always projected along its own ``dim``.

    Returns:
        The same model.

    Raises:
        WnormError: a bad ``radius``, ``dim`` or pattern, nothing selected, a slice of norm 0, a
            radius the tensor's dtype cannot hold (a float16 entry past 65504, or a slice
            rounded to all zeros), or a sharded tensor whose slices are split across ranks.
            The model is left as it was.

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.project_(torch.nn.Linear(4, 3), radius="unit")
        >>> torch.allclose(net.weight.norm(dim=1), torch.ones(3))
        True
    """
    fn = "wnorm.project_"
    if isinstance(model, torch.optim.Optimizer):
        raise WnormError(f"{fn}: takes (model, radius), and got an optimizer first; to project "
                         "after every step, call wnorm.project_after_step(optimizer, model, "
                         "radius)")
    radius = _check_radius(fn, radius)
    if radius == "initial":
        raise WnormError(f"{fn}: radius='initial' holds each slice at its norm when the "
                         "projection starts, which a one-off projection leaves as it is; use "
                         "wnorm.project_after_step(optimizer, model, radius='initial')")
    targets = _select(fn, model, radius, types, include, exclude, dim)
    if not targets:
        raise _nothing(fn, model) if radius is None else WnormError(
            f"{fn}: no weight of {type(model).__name__} was selected (include={include!r}, "
            f"exclude={exclude!r})")
    _resolve(fn, targets)
    with torch.no_grad():
        for t in targets:
            _land_writes(t)
            _project(t)
    return model


# the same selection options as project_: both are public, so each spells out its signature
def project_after_step(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    radius: str | float | Tensor | None = None,
    *,
    types: Iterable[type[nn.Module]] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | type[nn.Module] | Iterable[str | type[nn.Module]] = (),
    dim: int | None | object = DEFAULT,
) -> Projection:
    r"""After every ``optimizer.step()``, project the chosen weights of ``model`` that this
    optimizer updates onto their spheres: :math:`v_i \leftarrow r_i\,v_i/\lVert v_i\rVert`.

    The selection is :func:`project_`'s (forced layers always, the others when ``radius`` is
    given), restricted to the parameters of ``optimizer``: with several optimizers, register
    one projection per optimizer. The weights are projected once now, so the constraint holds
    from the first step, then by a step post-hook (``Optimizer.register_step_post_hook``) after
    each step, with no host sync. A step skipped by ``torch.amp.GradScaler`` (inf gradients)
    does not call ``step()`` and changes nothing; with a fused optimizer (``fused=True``) the
    scaler calls ``step()``, which skips on the device, and the projection then runs on rows
    already on their sphere (moving them by a rounding, ~1e-7).

    A weight is held on one sphere at a time: registering it on other spheres (another radius
    or dim) while a live projection holds it, on this optimizer or another, is an error; on the
    same spheres it is allowed, and only repeats the work. A projection is live until
    ``.remove()``, or until its optimizer is garbage-collected: a second training stage with a
    new optimizer needs a new projection (forced layers warn when none holds them).

    Modes: ``"unit"`` (nGPT, SimbaV2), ``"sqrt_fan_in"`` (EDM2), ``"initial"`` (NaP: each slice
    at its norm now), a number. Forced weight normalization is this projection plus its map:
    ``wnorm.forced_weight_norm`` layers are always projected onto their own sphere, and warn at
    their first training forward when no projection holds them.

    Args:
        optimizer: any ``torch.optim.Optimizer``, built on the parameters as they are now (after
            ``wnorm.apply``/``forced_weight_norm``, and after ``fully_shard`` under FSDP2).
            Register after loading a checkpoint: ``"initial"`` remembers the norms of now.
        model: the model (or a DDP/FSDP2 wrapper of it) that holds the weights.
        radius, types, include, exclude, dim: as :func:`project_`, plus ``"initial"``.

    Returns:
        A :class:`Projection`: ``.names`` lists the projected tensors, calling it projects now,
        ``.remove()`` unregisters it.

    Raises:
        WnormError: as :func:`project_`, ``optimizer`` is not an Optimizer, it updates none of
            the selected weights, or a live projection holds one of them on other spheres.

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.weight_norm(torch.nn.Linear(16, 4))
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> proj = wnorm.project_after_step(opt, net, radius="initial")
        >>> start = net.weight_v.norm(dim=1).detach().clone()
        >>> for _ in range(3):
        ...     opt.zero_grad(); net(torch.randn(8, 16)).pow(2).sum().backward(); opt.step()
        >>> torch.allclose(net.weight_v.norm(dim=1), start)  # plain WN would have grown it
        True
    """
    fn = "wnorm.project_after_step"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise WnormError(f"{fn}: optimizer must be a torch.optim.Optimizer; got "
                         f"{type(optimizer).__name__} (arguments are (optimizer, model, ...))")
    radius = _check_radius(fn, radius)
    targets = _select(fn, model, radius, types, include, exclude, dim)
    if not targets:
        raise _nothing(fn, model) if radius is None else WnormError(
            f"{fn}: no weight of {type(model).__name__} was selected (include={include!r}, "
            f"exclude={exclude!r})")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = [t for t in targets if id(t.param) in owned]
    if not mine:
        shown = ", ".join(t.name for t in targets[:5]) + (", ..." if len(targets) > 5 else "")
        raise WnormError(
            f"{fn}: {type(optimizer).__name__} updates none of the {len(targets)} selected "
            f"weights ({shown}); build the optimizer on model.parameters() after "
            "wnorm.apply/forced_weight_norm (and after fully_shard), then register this")
    _resolve(fn, mine)
    _check_not_held(fn, optimizer, mine)
    proj = Projection(mine)
    proj()
    proj._handle = optimizer.register_step_post_hook(proj._hook)
    return proj

