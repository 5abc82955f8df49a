r"""Weight normalization of one parameter: :math:`w = g\,v/\lVert v\rVert`, and its removal."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from . import _classes, _held, _pytorch_wn, _reparam, _slot
from .errors import WnormError, expect_module, warn_at_user
from .maps import Map, WeightNorm, norm

__all__ = ["weight_norm", "remove_weight_norm", "is_weight_normalized", "default_dim",
           "reparameterize", "DEFAULT"]

#: sentinel for ``dim``: "the output-unit axis of this layer type"
DEFAULT: Any = object()

_LOW = (torch.float16, torch.bfloat16)


#: layer types whose output units lie along dim 0 (rows, gate rows, output channels)
_ROWS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag,
         nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)

#: the layer types already told that dim 0 was assumed (weak: a class made at run time goes)
_warned: weakref.WeakSet[type] = weakref.WeakSet()


def _is_class(module: nn.Module, name: str, where: str) -> bool:
    """Whether ``module`` is (a subclass of) ``where``'s class ``name``, found by name so that
    the library defining it is never imported here."""
    return any(c.__name__ == name and c.__module__.startswith(where)
               for c in type(module).__mro__)


def default_dim(module: nn.Module, name: str = "weight") -> int:
    """The output-unit axis of ``module.<name>``: 1 for ConvTransposeNd weights (stored
    ``(in, out/groups, *k)``) and transformers' ``Conv1D`` (GPT-2's Linear, stored
    ``(in, out)``), 0 otherwise (Linear, ConvNd, Embedding rows, RNN gate rows)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
        return 1
    if name == "weight" and _is_conv1d(module):
        return 1
    return 0


def _is_conv1d(module: nn.Module) -> bool:
    return _is_class(module, "Conv1D", "transformers.") and hasattr(module, "nf")


def _assumed_dim(module: nn.Module, name: str) -> int:
    """:func:`default_dim`, with a warning (once per type) when the type is not one whose
    output-unit axis is known: dim 0 is the input axis of a weight stored (in, out)."""
    dim = default_dim(module, name)
    cls = _classes.base_class(module)
    known = isinstance(module, _ROWS) or _is_conv1d(module) or _is_class(
        module, "Linear", "torch_geometric.")
    if not known and cls not in _warned:
        _warned.add(cls)
        warn_at_user(  # the user's call, not wnorm's line (from apply or here)
            f"wnorm: {cls.__module__}.{cls.__qualname__} is no layer type whose output-unit axis "
            f"wnorm knows; it assumed dim=0 for '{name}' (one g per slice along axis 0). If the "
            "output units lie along another axis, pass dim= (wnorm.apply(model, dim=...) or "
            "wnorm.weight_norm(module, dim=...))")
    return dim


def _label(module: nn.Module, where: str) -> str:
    kind = _classes.base_class(module).__name__
    return f"{where} ({kind})" if where else kind


def _check_dim(label: str, name: str, dim: Any, shape: tuple[int, ...]) -> None:
    if dim is None:
        return
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise WnormError(f"{label}: dim must be an int or None; got {dim!r}")
    if dim < 0:
        raise WnormError(
            f"{label}: dim {dim} is ambiguous: PyTorch's weight_norm reads dim=-1 as 'the "
            "whole tensor', Python indexing as 'the last axis'; pass dim=None for one norm "
            f"over the whole tensor, or an axis 0..{len(shape) - 1}"
        )
    if not shape or dim >= len(shape):
        raise WnormError(f"{label}: dim {dim} is out of range for '{name}' of shape {shape} "
                         f"(expected None or 0 <= dim < {len(shape)})")


def _check_weight(label: str, name: str, module: nn.Module, w: torch.Tensor, m: Map) -> None:
    """Refuse a weight the map cannot represent: non-finite, overflowing or zero-norm slices.
    A weight on the meta device has no values to check (a model built there for FSDP2 or a
    large checkpoint gets its values after ``to_empty``)."""
    if w.numel() == 0:  # no slice has a norm (torch's kernel raises a reshape error here)
        raise WnormError(f"{label}: '{name}' of shape {tuple(w.shape)} is empty: there is no "
                         "direction to normalize; exclude this layer")
    if not (w.is_floating_point() or w.is_complex()):  # torch's norm error names no layer
        raise WnormError(f"{label}: '{name}' is {w.dtype}; weight normalization needs a "
                         "floating-point weight")
    if w.is_meta:
        return
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise WnormError(f"{label}: '{name}' has {bad} non-finite values (NaN or inf)")
        wide = w.float() if w.dtype in _LOW else w
        # the length g holds: the L1 norm for a balanced weight norm, larger than the L2 one
        length = getattr(m, "length", norm)
        n = length(m.direction(wide), m.dim)

        def exact() -> torch.Tensor:
            # in float64, where no sum of squares under- or overflows (only when a check
            # fails: a float64 copy of a large weight is not free): tells a norm the dtype
            # cannot hold from one whose sum of squares it cannot
            return length(m.direction(w.detach().to(torch.promote_types(w.dtype,
                                                                         torch.float64))), m.dim)

        if not bool(torch.isfinite(n.to(w.dtype)).all()):
            if bool(torch.isfinite(exact().to(w.dtype)).all()):
                raise WnormError(
                    f"{label}: the norms of '{name}' fit {w.dtype}, but their sums of squares "
                    f"overflow {wide.dtype}, in which they are computed (largest |entry| "
                    f"{float(w.abs().max()):.3g}); rescale the weight")
            raise WnormError(
                f"{label}: the norms of '{name}' overflow {w.dtype} (largest |entry| "
                f"{float(w.abs().max()):.3g}); rescale the weight or use a wider dtype")
        zero = (n == 0).flatten().nonzero().flatten().tolist()
        tiny = []
        if zero:  # a slice with a nonzero entry whose norm still reads 0: its squares underflow
            d = m.direction(wide)
            rows = d.reshape(1, -1) if m.dim is None else d.movedim(m.dim, 0).reshape(
                d.shape[m.dim], -1)
            tiny = [zero[i] for i in (rows[zero] != 0).any(1).nonzero().flatten().tolist()]
    if tiny:
        where_txt = "" if m.dim is None else f" along dim {m.dim}"
        raise WnormError(
            f"{label}: {len(tiny)} of {n.numel()} slices{where_txt} of '{name}' (indices "
            f"{tiny[:10]}{'...' if len(tiny) > 10 else ''}) are not zero, but their sums of "
            f"squares underflow {wide.real.dtype if wide.is_complex() else wide.dtype}, in "
            "which their norms are computed (entries below about 1e-19 in float32, 1e-154 in "
            "float64): their norms would be 0; rescale the weight")
    if zero:
        where_txt = "" if m.dim is None else f" along dim {m.dim}"
        what = "zero norm" if m.kind in ("wn", "forced") else "zero norm after centering (constant)"
        pad = getattr(module, "padding_idx", None)
        hint = ""
        if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and pad is not None
                and m.dim == 0 and pad in zero):
            hint = (f"; row {pad} is the padding_idx row, which nn.Embedding sets to zeros and "
                    "never trains: leave this embedding unnormalized (exclude it), or build it "
                    "without padding_idx")
        raise WnormError(
            f"{label}: {len(zero)} of {n.numel()} slices{where_txt} of '{name}' have {what} "
            f"(indices {zero[:10]}{'...' if len(zero) > 10 else ''}); weight normalization "
            "needs a direction for every output unit" + hint)


def reparameterize(module: nn.Module, name: str, dim: Any, make: Any, *,
                   where: str = "") -> nn.Module:
    """Check, then attach ``make(dim)`` (a :class:`wnorm.maps.Map`) to ``module.<name>``.

    A weight normalized by PyTorch (either API) is adopted when ``make`` is weight norm: its g
    and v Parameters are kept as they are, and so is its axis unless ``dim`` names another.
    """
    expect_module("wnorm", module)
    label = _label(module, where)
    along = module.__dict__.get("_wn_along", frozenset())
    if _slot.slot(module, name) is not None:
        if name in along and make is WeightNorm:  # adopted with a sibling, as asked now
            module.__dict__["_wn_along"] = along - {name}
            axis = _slot.slot(module, name).map.dim
            if dim is not DEFAULT and dim != axis:
                raise WnormError(_axis_kept(label, name, axis, dim))
            return module
        raise WnormError(f"{label}: '{name}' is already weight-normalized by wnorm")
    found = _pytorch_wn.find(module)
    torch_wn = next((f for f in found if f.name == name), None)
    others = [n for n in getattr(module, "parametrizations", {})
              if n not in {f.name for f in found}]
    if others:  # wnorm's class and parametrize's generated class cannot be stacked safely
        raise WnormError(f"{label}: {others} already have a PyTorch parametrization "
                         "(torch.nn.utils.parametrize) other than weight norm; wnorm cannot "
                         "share a module with one: remove it first")
    # the module's other weights that PyTorch's parametrizations normalize are adopted with
    # this one (their g, v and axes kept): wnorm's class on parametrize's generated one fails
    # (an RNN's forward raised a TypeError); wnorm.apply's call for each then finds it done
    siblings = [f for f in found if f.api == "new" and f.name != name]
    for f in siblings:  # checked before anything changes
        if dim is not DEFAULT and dim != f.dim:
            raise WnormError(_axis_kept(label, f.name, f.dim, dim))
    if torch_wn is not None:
        _adopt(module, torch_wn, dim, make, label, where)
        _adopt_along(module, siblings, label, where)
        return module
    weight = module._parameters.get(name)
    if weight is None:
        have = [n for n, p in module._parameters.items() if p is not None]
        raise WnormError(f"{label}: no parameter named '{name}' to weight-normalize; "
                         f"its parameters are {have}")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise WnormError(
            f"{label}: '{name}' is not initialized yet (a lazy module materializes it at its "
            "first forward); run one forward pass on a batch before weight-normalizing it")
    _check_dtensor(label, name, weight)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
        raise WnormError(
            f"{label}: sparse=True gives '{name}' a sparse gradient, and the gradients of g and "
            "v (eqs. 3-4) need every row's dot product with it densely (PyTorch's backward "
            "fails on it); build the embedding with sparse=False to weight-normalize it")
    if dim is DEFAULT:
        dim = _assumed_dim(module, name)
    _check_dim(label, name, dim, tuple(weight.shape))
    m = make(dim)
    w = weight.detach()
    _check_weight(label, name, module, w, m)
    with torch.no_grad():
        g, v = m.split(w.clone())
    req = weight.requires_grad
    _adopt_along(module, siblings, label, where)
    _reparam.attach(module, name, m,
                    None if g is None else nn.Parameter(g, requires_grad=req),
                    nn.Parameter(v, requires_grad=req), where=label)
    return module


def _check_dtensor(label: str, name: str, t: torch.Tensor) -> None:
    if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
        raise WnormError(
            f"{label}: '{name}' is sharded (a DTensor, e.g. after FSDP2's fully_shard or tensor "
            "parallelism); call wnorm.apply (and wnorm.data_init) on the unsharded model first, "
            "then fully_shard or DDP")


def _adopt(module: nn.Module, found: _pytorch_wn.Found, dim: Any, make: Any, label: str,
           where: str) -> nn.Module:
    """Turn PyTorch's weight norm of ``found`` into wnorm's, keeping g, v and the axis."""
    if make is not WeightNorm:
        raise WnormError(f"{label}: '{found.name}' is weight-normalized by PyTorch "
                         f"(torch.nn.utils{'.parametrizations' if found.api == 'new' else ''}"
                         ".weight_norm); wnorm.fold(model) first to reparameterize it otherwise")
    if dim is not DEFAULT and dim != found.dim:
        raise WnormError(_axis_kept(label, found.name, found.dim, dim))
    g0 = _pytorch_params(module, found)
    _check_dtensor(label, found.name, g0[1])
    g, v = _pytorch_wn.strip(module, found)
    _reparam.attach(module, found.name, WeightNorm(found.dim), g, v, where=label)
    # code written for PyTorch's weight norm (a model's own remove_weight_norm()) still finds it
    module.register_forward_pre_hook(_pytorch_wn.Adopted(found.name, found.dim))
    return module


def _axis_kept(label: str, name: str, axis: Any, dim: Any) -> str:
    return (f"{label}: '{name}' is weight-normalized by PyTorch along dim {axis}; adopting it "
            f"keeps that axis (got dim={dim!r}); wnorm.fold(model) first to normalize along "
            "another")


def _adopt_along(module: nn.Module, siblings: list[_pytorch_wn.Found], label: str,
                 where: str) -> None:
    """Adopt ``siblings`` (PyTorch's parametrize weight norms of ``module``), noting them as
    adopted along: a later ``weight_norm`` of one of them is then done, not an error."""
    for f in siblings:
        _adopt(module, f, DEFAULT, WeightNorm, label, where)
    if siblings:  # a new set: apply's undo puts the old one back
        module.__dict__["_wn_along"] = module.__dict__.get("_wn_along", frozenset()) | {
            f.name for f in siblings}


def _pytorch_params(module: nn.Module, found: _pytorch_wn.Found) -> tuple[Any, Any]:
    if found.api == "old":
        return module._parameters[found.name + "_g"], module._parameters[found.name + "_v"]
    chain = module.parametrizations[found.name]
    return chain.original0, chain.original1


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = DEFAULT, *,
                where: str = "") -> nn.Module:
    r"""Reparameterize ``module.<name>`` as :math:`w = g\,\frac{v}{\lVert v\rVert}`, one g per output unit.

    The norm runs over every axis except ``dim``, so :math:`\lVert w\rVert = g` for each slice
    whatever v is (Salimans & Kingma, 2016, eq. 2, https://arxiv.org/abs/1602.07868).
    ``<name>`` leaves the parameters; ``<name>_g`` (kept-dim, as PyTorch's old API) and
    ``<name>_v`` join them, split from the weight so that the module computes exactly what it
    did. ``module.<name>`` stays readable, computed from g and v at every access (wrap
    inference in :func:`wnorm.cached` to compute it once). A weight normalized by PyTorch's
    own ``weight_norm`` (either API) is adopted: the same g and v Parameters, the same axis.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``; for RNNs e.g. ``"weight_hh_l0"``).
        dim: the output-unit axis. Default: 0 for Linear, ConvNd, Embedding and RNN weights,
            1 for ConvTransposeNd and transformers' Conv1D; 0, with a warning, for other
            types. ``None``: one norm, and one g, for the whole tensor.
            Negative values are refused: PyTorch reads -1 as "whole tensor", Python as "last".
        where: a name for the module in error messages (``wnorm.apply`` passes its path).

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: ``name`` is not a parameter, is already normalized by wnorm, is not
            initialized (lazy module), is sharded, ``dim`` is out of range, or the weight has
            non-finite values or zero-norm slices.

    Tied weights: this function sees one module; a Parameter another module holds too is
    untied (the other keeps it as a plain weight). :func:`wnorm.apply` on the model that holds
    both keeps the tie (one g and v for every holder) or raises, and
    :func:`remove_weight_norm` on each holder keeps it too.

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.weight_norm(torch.nn.Linear(3, 4))
        >>> sorted(n for n, _ in layer.named_parameters())
        ['bias', 'weight_g', 'weight_v']
        >>> torch.allclose(layer.weight.norm(dim=1), layer.weight_g.squeeze(1))
        True
    """
    return reparameterize(module, name, dim, WeightNorm, where=where)


#: id(v) -> (v, the plain weight its first removal made, both weakly; that weight's dtype and
#: device then): a tie's other holders still hold v, and their removal reuses that Parameter
#: (across a cast or move made since, within its rounding). An entry goes when v does.
_removed: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], torch.dtype,
                          torch.device]] = {}


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    r"""Undo :func:`weight_norm` (or any wnorm reparameterization): ``module.<name>`` becomes a
    plain Parameter holding the computed weight (``requires_grad`` kept); ``<name>_g`` and
    ``<name>_v`` go away, and the module gets its class back once nothing stays normalized.

    Tied weights (one g and v for several modules, as :func:`wnorm.apply` makes them) stay
    tied: removing it from each holder in turn gives them all the Parameter the first removal
    made. Between removals they are apart; if one side changed meanwhile, a later holder keeps
    its own weight (its outputs unchanged) and a warning says the tie is lost.

    Raises:
        WnormError: ``module.<name>`` is not weight-normalized by wnorm, or its weight has NaN
            or inf values (a zero row of v, a non-finite g); the module is then unchanged.
    """
    expect_module("remove_weight_norm", module)
    s = _slot.slot(module, name)
    if s is None:
        raise WnormError(f"{_label(module, '')}: '{name}' is not weight-normalized by wnorm")
    if s.held is not None:  # rows written into the weight count before comparing it
        _held.flush(module, s)
    g, v = _slot.pair(module, s)
    with torch.no_grad():  # a NaN row would stay in the plain Parameter for good, as fold refuses
        _slot.check_finite(s, s.map.weight(g, v))
    _reparam.detach(module, name, _earlier_weight(module, s, g, v))
    w = module._parameters[name]
    _removed[id(v)] = (weakref.ref(v, lambda _, k=id(v): _removed.pop(k, None)),
                       weakref.ref(w), w.dtype, w.device)
    return module


def _earlier_weight(module: nn.Module, s: _slot.Slot, g: Any, v: torch.Tensor) -> dict:
    """``detach``'s tie map: v's weight from an earlier removal, if that still equals this one."""
    refs = _removed.get(id(v))
    w = refs[1]() if refs is not None and refs[0]() is v else None
    if w is None:
        return {}
    with torch.no_grad():
        mine = s.map.weight(g, v)
        if (w.shape, w.dtype, w.device) == (mine.shape, mine.dtype, mine.device) and (
                bool(torch.equal(w, mine)) or ((w.dtype, w.device) != refs[2:]
                                               and _rounding_apart(w, mine, refs[2]))):
            return {id(v): (v, w)}
    warnings.warn(
        f"{s.where or _label(module, '')}: '{s.name}' shared g and v with a weight whose "
        "weight norm was removed earlier, and one of them changed since; it keeps its own "
        "weight, no longer tied: remove weight norm from every holder of a tie before training "
        "on", stacklevel=3)
    return {}


def _rounding_apart(a: torch.Tensor, b: torch.Tensor, was: torch.dtype) -> bool:
    """Whether ``a`` (a weight cast from ``was``) and ``b`` (recomputed in ``a``'s dtype)
    differ by no more than the casts' rounding: 2.5 ulps of the coarser dtype, relative to
    each entry (plus a thousandth of the largest, for entries near 0). A model cast or moved
    between two removals (``.double()``, ``.to(torch.bfloat16)``, ``.cuda()``, whose kernels
    round otherwise) is no change of either side; without a cast or move, only equal weights
    are."""
    if not a.is_floating_point() or not a.numel():
        return bool(torch.equal(a, b))
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(was).eps)
    room = a.abs() + 1e-3 * a.abs().amax()
    return bool(((a - b).abs() <= 2.5 * eps * room).all())


def is_weight_normalized(module: nn.Module, name: str | None = None) -> bool:
    """Whether wnorm normalizes ``module.<name>`` (any parameter of it when ``name`` is None)."""
    expect_module("is_weight_normalized", module)
    specs = _slot.slots_of(module)
    if not specs:
        return False
    return True if name is None else name in specs
