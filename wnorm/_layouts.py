r"""Weight-norm layouts of a state dict: read :math:`(g, v)` pairs by key name, write them back.

==============  =====================================================================
``plain``       ``<module>.<name>`` holds :math:`w`
``torch-old``   ``<module>.<name>_g`` and ``<module>.<name>_v`` (``torch.nn.utils.weight_norm``)
``torch-new``   ``<module>.parametrizations.<name>.original0`` (g) and ``original1`` (v)
                (``torch.nn.utils.parametrizations.weight_norm``)
``wnorm``       the ``torch-old`` key names
==============  =====================================================================

g is stored kept-dim (``(out, 1, 1)`` for a Conv1d normalized along dim 0, ``(1, 1, K)`` for
Wav2Vec2's positional conv along dim 2, a 0-dim scalar for one norm over the whole tensor), so
the axis a pair was normalized along is read off g's shape: the one axis where g has v's size.
Shared by :mod:`wnorm.state_dict` (loading into a model, converting) and :mod:`wnorm._files`
(converting files for the command line).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import WnormError
from .maps import WeightNorm, graph_norm, kind_mismatch
from .maps import norm as maps_norm

__all__ = ["FORMATS", "KEEP", "Src", "read", "source_dim", "norm", "wide", "weight", "gain",
           "cast", "check_finite", "check_computable", "bad_slices", "everywhere", "base_and_role", "has_pair", "convert"]

#: The layouts :func:`convert` writes.
FORMATS: tuple[str, ...] = ("plain", "torch-old", "torch-new", "wnorm")

#: ``dim`` of :func:`convert` that keeps each pair's own axis.
KEEP = "keep"

_NEW = ".parametrizations."  # torch-new: <prefix>parametrizations.<name>.original0 / original1


@dataclass
class Src:
    """One weight of a state dict, whatever its layout: ``w`` alone, or the pair ``(g, v)``."""

    keys: tuple[str, ...]  # its keys in the state dict (one, or g's then v's)
    w: Any = None  # plain: the tensor (or, for _extra_state, any object)
    g: Tensor | None = None
    v: Tensor | None = None

    @property
    def pair(self) -> bool:
        return self.v is not None


def _split_new(key: str) -> tuple[str, str] | None:
    """``a.parametrizations.weight.original0`` -> ``("a.weight", "0")``, else None."""
    head, sep, rest = ("." + key).rpartition(_NEW)
    if not sep:
        return None
    name, dot, last = rest.rpartition(".")
    if not dot or "." in name or last not in ("original0", "original1"):
        return None
    prefix = head[1:] + "." if head else ""
    return prefix + name, last[-1]


def base_and_role(key: str) -> tuple[str, str]:
    """The weight a key belongs to and its role, from the name alone: ``a.weight_g`` ->
    ``("a.weight", "g")``, ``a.parametrizations.weight.original1`` -> ``("a.weight", "v")``,
    ``a.bias`` -> ``("a.bias", "w")``."""
    new = _split_new(key)
    if new is not None:
        return new[0], "g" if new[1] == "0" else "v"
    if key.endswith(("_g", "_v")) and len(key) > 2:
        return key[:-2], key[-1]
    return key, "w"


def read(state_dict: Mapping[str, Any]) -> dict[str, Src]:
    """Group a state dict by weight: canonical key (``a.weight``) -> :class:`Src`, in order.

    One weight held in two layouts (``a.weight`` beside ``a.weight_g``/``a.weight_v``, or
    torch-old keys beside torch-new ones) is an error: which one is meant cannot be told."""
    if not isinstance(state_dict, Mapping):
        raise WnormError(f"expected a state dict (a mapping of names to tensors); got "
                         f"{type(state_dict).__name__}")
    out: dict[str, Src] = {}

    def put(base: str, src: Src) -> None:
        if base in out:
            first, second = ("/".join(f"'{k}'" for k in s.keys) for s in (out[base], src))
            raise WnormError(
                f"{first} and {second} both hold the weight '{base}', in two layouts; expected "
                "one layout per weight: keep the one you mean and drop the other"
            )
        out[base] = src

    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise WnormError(f"state dict keys must be strings; got {key!r}")
        if not isinstance(value, Tensor) and not key.endswith("_extra_state"):
            inner = [k for k, v in state_dict.items() if isinstance(v, Mapping) and v
                     and all(isinstance(t, Tensor) for t in v.values())]
            where = ", ".join(f"checkpoint[{k!r}]" for k in inner)
            hint = "pass the state dict inside it" + (f" ({where})" if inner else "")
            kind = type(value).__name__
            raise WnormError(
                f"state dict entry '{key}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not "
                f"a tensor; a nested checkpoint? {hint}"
            )
        new = _split_new(key)
        if new is not None:
            base, role = new
            other = key[:-1] + ("1" if role == "0" else "0")
            if other in state_dict:
                if role == "0":
                    put(base, Src((key, other), g=value, v=state_dict[other]))
                continue
        if key.endswith(("_g", "_v")) and len(key) > 2:
            base, role = key[:-2], key[-1]
            other = base + ("_v" if role == "g" else "_g")
            if other in state_dict:
                if role == "g":
                    put(base, Src((key, other), g=value, v=state_dict[other]))
                continue
        put(key, Src((key,), w=value))
    return out


def source_dim(key: str, g: Tensor, v: Tensor) -> int | None:
    """The axis ``(g, v)`` was normalized along, read off g's shape (None: the whole tensor)."""
    gs, vs = tuple(g.shape), tuple(v.shape)
    if g.numel() == 1:
        # 0-dim (dim=None) or all-ones kept-dim: one slice, the whole tensor, whatever the axis.
        return None
    if len(gs) == len(vs):
        axes = [d for d in range(len(vs)) if gs[d] != 1]
        if len(axes) == 1 and gs[axes[0]] == vs[axes[0]]:
            return axes[0]
    elif len(gs) == 1 and vs:  # a squeezed g, shape (n,): accept it only when unambiguous
        axes = [d for d in range(len(vs)) if vs[d] == gs[0]]
        if len(axes) == 1:
            return axes[0]
    raise WnormError(
        f"'{key}': cannot tell which axis this g normalizes: expected a kept-dim shape with v's "
        f"size on one axis and 1 elsewhere (v has shape {vs}), or a scalar; got shape {gs}"
    )


#: :math:`\lVert w\rVert` over every axis but ``dim``, kept-dim (a scalar for None)
norm = graph_norm


def wide(t: Tensor) -> Tensor:
    """``t`` detached, in float64 (or wider: complex128 stays)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float64))


def weight(src: Src, dtype: torch.dtype | None = None, where: str = "") -> Tensor:
    """:math:`w = g\\,v/\\lVert v\\rVert` of a pair in ``dtype`` (default: v's): the bits a
    weight-normalized layer's forward gives when g, v and ``dtype`` are all float32 or all
    float64, else computed in float64, never through a narrower dtype on the way.

    ``where`` says for what the weight is computed, for the overflow error."""
    assert src.g is not None and src.v is not None
    dim = source_dim(src.keys[0], src.g, src.v)
    g, v = wide(src.g), wide(src.v)
    n = norm(v, dim)
    if bool((n == 0).any()):
        zero = (n == 0).flatten().nonzero().flatten().tolist()
        raise WnormError(
            f"'{src.keys[1]}': {len(zero)} slices have zero norm (indices {zero[:10]}); "
            "w = g * v / ||v|| is undefined there; expected a nonzero v in every slice"
        )
    g = g.reshape(n.shape) if g.numel() == n.numel() else g
    w = cast(src.keys[1], v * (g / n), dtype or src.v.dtype, f" of w = g * v / ||v||{where}")
    if w.dtype == src.g.dtype == src.v.dtype and w.dtype in (torch.float32, torch.float64):
        # the very bits a weight-normalized layer computes from this pair (the kernel PyTorch's
        # and wnorm's forwards share): a plain checkpoint then matches the model and fold
        return WeightNorm(dim).weight(src.g.detach().reshape(g.shape), src.v.detach())
    return w


def everywhere(x: Tensor) -> Tensor:
    """A reduction's value, the same on every rank: a DTensor's (an FSDP2 shard's) partial
    result is reduced over the ranks, which all load the same keys (a rank-local answer sent
    one rank into an error path, with its collectives, alone)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def cast(key: str, t: Any, dtype: torch.dtype, what: str = "") -> Any:
    """``t`` in ``dtype``, refused (naming ``key``) where a finite value overflows it.

    Anything but a floating-point or complex tensor is returned as it is."""
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        return t
    out = t.detach().to(dtype)
    if out.is_floating_point() or out.is_complex():
        finite = torch.isfinite(out)
        if not bool(everywhere(finite.all())):
            big = float(everywhere(t.detach().abs().max()))
            raise WnormError(
                f"'{key}': {int(everywhere((~finite).sum()))} of {t.numel()} values{what} "
                f"overflow {dtype} "
                f"(largest |value| {big:.3g}); expected values that fit {dtype}: use a wider "
                "dtype (or rescale the weight)"
            )
    return out


def bad_slices(v: Tensor, dim: int | None, map: Any = None) -> list[int]:
    """The slices along ``dim`` of v whose norms a layer computes as 0, inf or NaN (a zero row,
    a NaN or inf entry, or a sum of squares that under- or overflows), taken as its forward
    takes them: ``map``'s direction and length (weight norm's by default), in float32 for half
    precision, unrounded (a float16 row whose norm is past 65504 is fine). Under FSDP2 the
    answer is gathered, the same on every rank (each loads the same keys). A host sync."""
    m = WeightNorm(dim) if map is None else map
    x = v.detach().float() if v.dtype in (torch.float16, torch.bfloat16) else v.detach()
    n = getattr(m, "length", maps_norm)(m.direction(x), m.dim)
    bad = (n == 0) | ~torch.isfinite(n)
    bad = bad.full_tensor() if hasattr(bad, "full_tensor") else bad
    return bad.flatten().nonzero().flatten().tolist()


def check_computable(key: str, v: Tensor, dim: int | None) -> None:
    """Refuse a v whose norms a layer cannot compute (:func:`bad_slices`): the sum of squares
    of a slice with entries below about 1e-19 underflows to 0 in float32 and one with entries
    above about 1e19 overflows, though the float64 norms the checks before take are fine
    (w would be inf, NaN or 0 there)."""
    if v.is_meta or not (v.is_floating_point() or v.is_complex()) or v.numel() == 0:
        return
    idx = bad_slices(v, dim)
    if idx:
        v = v.detach().full_tensor() if hasattr(v, "full_tensor") else v.detach()
        compute = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else (
            v.real.dtype if v.is_complex() else v.dtype)
        rows = v if dim is None else v.movedim(dim, 0).reshape(v.shape[dim], -1)[idx]
        raise WnormError(
            f"'{key}': {len(idx)} slices {_along(dim)} (indices {idx[:10]}) have norms that "
            f"{compute} cannot compute: their sums of squares under- or overflow (largest "
            f"|entry| there {float(rows.abs().max()):.3g}), and w = g * v / ||v|| would be "
            "inf, NaN or 0 there; expected a weight that a layer of this dtype can normalize: "
            "rescale it")


def check_finite(key: str, t: Any) -> None:
    """Refuse NaN/inf in a floating-point or complex tensor, naming ``key``."""
    if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
        if not bool(everywhere(torch.isfinite(t).all())):
            bad = int(everywhere((~torch.isfinite(t)).sum()))
            raise WnormError(
                f"'{key}': expected finite values; got {bad} NaN/inf of {t.numel()}"
            )


# --------------------------------------------------------------------------- writing layouts
def _along(dim: int | None) -> str:
    return "over the whole tensor" if dim is None else f"along dim {dim}"


def _kept(v: Tensor, dim: int | None) -> tuple[int, ...]:
    """g's shape for ``v`` normalized along ``dim``: v's size there, 1 elsewhere; () for None."""
    if dim is None:
        return ()
    return tuple(v.shape[d] if d == dim else 1 for d in range(v.dim()))


def _same_slices(shape: tuple[int, ...], a: int | None, b: int | None) -> bool:
    """Whether norms along ``a`` and along ``b`` cut a tensor of ``shape`` into the same
    slices (an axis of size 1 gives one slice: the whole tensor, as None does)."""
    def canonical(d: int | None) -> int | None:
        return None if d is None or shape[d] == 1 else d

    return canonical(a) == canonical(b)


def _normalized_g(key: str, w: Tensor, dim: int | None, g_dtype: torch.dtype,
                  hint: str = "") -> Tensor:
    """g of ``w`` normalized along ``dim`` (kept-dim; 0-dim for None), as :func:`gain` gives it;
    refused when a slice is zero or its norm overflows (``hint`` says what to do instead)."""
    n = norm(wide(w), dim)
    # a DTensor shard's norms (FSDP2) gathered: every rank then sees every slice and refuses
    # alike (nonzero has no sharding rule, and a rank-local answer split the ranks)
    every = n.full_tensor() if hasattr(n, "full_tensor") else n
    if bool((every == 0).any()):
        zero = (every == 0).flatten().nonzero().flatten().tolist()
        raise WnormError(
            f"'{key}': expected a nonzero norm in every slice {_along(dim)} to normalize it "
            f"there; got {len(zero)} zero slices (indices {zero[:10]}), which have no direction "
            f"(w = g * v / ||v|| would be NaN there){hint}"
        )
    return gain(key, w, dim, g_dtype, f" of ||w|| {_along(dim)}", n)


def gain(key: str, v: Tensor, dim: int | None, g_dtype: torch.dtype, what: str = "",
         n: Tensor | None = None) -> Tensor:
    """g = ||v|| along ``dim`` (kept-dim), refused when it overflows ``g_dtype``. When g and v
    share a dtype, the forward's own norm (:meth:`WeightNorm.split`): g/||v|| is then exactly 1
    and the layer gives v back bit for bit; else the norm in float64 (``n``, when the caller has
    it), cast once."""
    g = cast(key, norm(wide(v), dim) if n is None else n, g_dtype, what)
    if g_dtype == v.dtype and v.is_floating_point():
        g = WeightNorm(dim).split(v.detach())[0].reshape(g.shape)
    return g


def _check_dim(key: str, t: Tensor, dim: int | None) -> None:
    if dim is not None and dim >= t.dim():
        raise WnormError(
            f"'{key}': dim {dim} is out of range for a tensor of shape {tuple(t.shape)}; "
            "expected an axis it has (or keep each pair's own axis)"
        )


def _relayout(src: Src, dim: int | None) -> tuple[Tensor, Tensor, bool]:
    """``(g, v, changed)`` of a pair normalized along ``dim``: g reshaped when the source's
    axis cuts the same slices, else the same weight from new ``g = ||w||``, ``v = w``."""
    assert src.g is not None and src.v is not None
    _check_dim(src.keys[1], src.v, dim)
    have = source_dim(src.keys[0], src.g, src.v)
    if _same_slices(tuple(src.v.shape), have, dim):
        g = src.g.reshape(_kept(src.v, dim))
        return g, src.v, tuple(g.shape) != tuple(src.g.shape)
    w = weight(src)  # computed in float64, in v's dtype
    return _normalized_g(src.keys[1], w, dim, src.g.dtype), w, True


def _kept_dim(src: Src) -> tuple[Tensor, bool]:
    """g with its kept-dim shape (what PyTorch's weight norm stores) and whether it changed:
    a squeezed g ``(n,)`` of a multi-axis v becomes ``(1, .., n, .., 1)``."""
    assert src.g is not None and src.v is not None
    if src.g.dim() != 1 or src.v.dim() <= 1 or src.g.numel() == 1:
        return src.g, False
    g = src.g.reshape(_kept(src.v, source_dim(src.keys[0], src.g, src.v)))
    return g, tuple(g.shape) != tuple(src.g.shape)


def _normalizable(key: str, t: Any) -> bool:
    last = key.rpartition(".")[2]
    return isinstance(t, Tensor) and last.startswith("weight") and t.dim() >= 2


def _pair_keys(ckey: str, to: str) -> tuple[str, str]:
    if to == "torch-new":
        head, dot, name = ckey.rpartition(".")
        prefix = head + "." if dot else ""
        return (f"{prefix}parametrizations.{name}.original0",
                f"{prefix}parametrizations.{name}.original1")
    return ckey + "_g", ckey + "_v"


def _bad_axis(dim: Any) -> bool:
    return dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0)


def _check_options(to: str, dim: Any) -> None:
    if not isinstance(to, str) or to not in FORMATS:
        # a state dict's repr would be the whole file: its type says it (arguments swapped)
        got = repr(to) if isinstance(to, str) else type(to).__name__ + (
            " (a state dict? the arguments are (state_dict, to))" if isinstance(to, Mapping)
            else "")
        raise WnormError(f"convert: expected 'to' in {list(FORMATS)}; got {got}")
    if isinstance(dim, str) and dim == KEEP:
        return
    if isinstance(dim, Mapping):
        bad = {k: d for k, d in dim.items() if not isinstance(k, str) or _bad_axis(d)}
        if bad:
            raise WnormError(
                f"convert: expected dim as a mapping of weight keys to an axis >= 0 or None "
                f"(one norm over the whole tensor); got {bad!r}")
    elif _bad_axis(dim):
        raise WnormError(
            f"convert: expected dim {KEEP!r}, None (one norm over the whole tensor), a mapping "
            f"of weight keys to axes, or an axis >= 0; got {dim!r} (a negative dim is refused: "
            "PyTorch reads -1 as the whole tensor, Python as the last axis)"
        )
    if to == "plain":
        raise WnormError(f"convert: dim={dim!r} chooses the axis of g and v; 'plain' writes w "
                         "alone: leave dim at 'keep'")


def _half_pair(key: str) -> str | None:
    """The missing partner's key when ``key`` reads as one half of a weight-norm pair (a
    torch-new ``original0``/``original1``, or ``weight.._g``/``weight.._v``), else None."""
    new = _split_new(key)
    if new is not None:
        return key[:-1] + ("1" if new[1] == "0" else "0")
    head, dot, last = key.rpartition(".")
    if last.startswith("weight") and last.endswith(("_g", "_v")) and len(last) > len("weight_"):
        return head + dot + last[:-2] + ("_v" if last.endswith("_g") else "_g")
    return None


def _spectral(state_dict: Mapping[str, Any]) -> set[str]:
    """The keys of layers normalized by ``torch.nn.utils.spectral_norm``: ``<w>_orig`` beside
    the buffers ``<w>_u`` and ``<w>_v`` (a GAN discriminator's, HiFi-GAN's). Its ``<w>_v`` is
    no half of a weight-norm pair, nor is ``<w>_orig`` a plain weight to normalize."""
    out: set[str] = set()
    for key in state_dict:
        if isinstance(key, str) and key.endswith("_orig"):
            trio = (key, key[:-5] + "_u", key[:-5] + "_v")
            if all(k in state_dict for k in trio):
                out.update(trio)
    return out


def has_pair(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds a weight-norm pair in any layout."""
    return any(src.pair for src in read(state_dict).values())


#: Why a plain weight's axis is not guessed for the ``wnorm`` layout, and what to do instead.
_APPLY_AXES = (
    "a state dict does not record layer types, and wnorm.apply's choice depends on them (a "
    "Linear's or ConvNd's weight along dim 0, a ConvTransposeNd's along dim 1, an Embedding's "
    "not at all)")


def _name_them(example: str = "KEY") -> str:
    quoted = "KEY" if example == "KEY" else f"'{example}'"
    return (f"name only the weights to normalize, with their axes: dim={{{quoted}: AXIS, ...}} "
            f"(wnorm convert --dim {example}=AXIS,...)")


def convert(state_dict: Mapping[str, Any], to: str, dim: Any = KEEP,
            normalize_plain: bool | None = None) -> tuple[dict[str, Any], int]:
    """``state_dict`` in layout ``to`` (see :func:`wnorm.convert_state_dict`), and how many
    weights were rewritten (renamed, reshaped or recomputed). Plain weights are normalized when
    ``normalize_plain`` (default: when the state dict holds no pair), along ``dim`` or, for
    ``dim="keep"``, along dim 0 (PyTorch's weight norm's default) for the torch layouts and not
    at all for ``wnorm``; a mapping ``dim`` normalizes or moves exactly the weights it names."""
    _check_options(to, dim)
    meta = getattr(state_dict, "_metadata", None)  # which map saved each pair (wnorm's)
    for path, entry in (meta.items() if isinstance(meta, Mapping) else ()):
        why = kind_mismatch(entry, None, state_dict, f"{path}." if path else "")
        if why:
            raise WnormError(f"{why}: converting reads every (g, v) as a weight norm's, which "
                             "gives another weight under another map; save wnorm.fold of the "
                             "model instead")
    sources = read(state_dict)
    spectral = _spectral(state_dict)
    for src in sources.values():
        for key, t in zip(src.keys, (src.g, src.v) if src.pair else (src.w,)):
            check_finite(key, t)
        missing = None if src.pair or src.keys[0] in spectral else _half_pair(src.keys[0])
        if missing is not None:
            raise WnormError(f"'{src.keys[0]}' is half of a weight-norm pair: '{missing}' is "
                             "missing; expected both halves (or a plain weight)")
    per_key = dim if isinstance(dim, Mapping) else None
    if per_key is not None:
        for key in per_key:
            t = None if key not in sources else (
                sources[key].v if sources[key].pair else sources[key].w)
            # a bias (or a scalar) split into g and v is no layout wnorm has; any other tensor
            # may be a weight wnorm.weight_norm(module, name) normalizes (in_proj_weight, W)
            if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()) or (
                    not sources[key].pair and (key.rpartition(".")[2].startswith("bias")
                                               or t.dim() == 0)):
                weights = [k for k, s in sources.items() if s.pair or _normalizable(k, s.w)]
                raise WnormError(
                    f"convert: dim names '{key}', which is no weight of the state dict; "
                    f"expected weight keys as the plain layout names them (e.g. {weights[:5]})")
    if normalize_plain is None:
        normalize_plain = not any(src.pair for src in sources.values())
    # the plain weights that become pairs, and their axes
    plain_axes: dict[str, int | None] = {}
    if per_key is not None:
        plain_axes = {k: d for k, d in per_key.items() if not sources[k].pair}
    elif normalize_plain:
        weights = [k for k, s in sources.items()
                   if not s.pair and _normalizable(k, s.w) and k not in spectral]
        if dim != KEEP or to != "wnorm":
            along = 0 if dim == KEEP else dim  # PyTorch's weight_norm(module) default: dim 0
            plain_axes = dict.fromkeys(weights, along)
        elif weights:  # not guessed: the wrong guess gives no g and v wnorm.apply's model takes
            warnings.warn(
                f"convert to 'wnorm': {len(weights)} plain weight(s) {weights[:5]} left plain: "
                f"{_APPLY_AXES}; wnorm.load_state_dict(wnorm.apply(model), sd) loads them as "
                f"they are; for g and v in the file, {_name_them(weights[0])}", stacklevel=3)
    out: dict[str, Any] = {}
    n = 0
    for ckey, src in sources.items():
        if to == "plain":
            if src.pair:
                out[ckey] = weight(src)
                n += 1
            else:
                out[ckey] = src.w
            continue
        along = dim if per_key is None else per_key.get(ckey, KEEP)
        if src.pair:
            source_dim(src.keys[0], src.g, src.v)  # reject a g no loader could read
            g, v, changed = src.g, src.v, src.keys[0] != _pair_keys(ckey, to)[0]
            if along != KEEP:
                g, v, rewritten = _relayout(src, along)
                changed = changed or rewritten
            elif to != "wnorm":  # PyTorch's weight norm stores g kept-dim
                g, reshaped = _kept_dim(src)
                changed = changed or reshaped
            n += changed
        elif ckey in plain_axes:
            along = plain_axes[ckey]
            _check_dim(ckey, src.w, along)
            # an all-zero row (an Embedding's padding row, a pruned unit) has no direction:
            # only the caller knows whether this weight is one to normalize at all
            hint = "" if per_key is not None else (
                f"; if '{ckey}' is to stay plain (an Embedding's padding row?), {_name_them()}")
            g, v = _normalized_g(ckey, src.w, along, src.w.dtype, hint), src.w
            n += 1
        else:
            out[ckey] = src.w
            continue
        gk, vk = _pair_keys(ckey, to)
        out[gk], out[vk] = g, v
    return out, n
