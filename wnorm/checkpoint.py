r"""Checkpoints across weight-norm layouts: :math:`w = g\,v/\lVert v\rVert` read in, written out.

Four layouts name the same weight ``<module>.<name>``:

==============  =====================================================================
``plain``       ``<module>.<name>`` holds :math:`w`
``torch-old``   ``<module>.<name>_g`` and ``<module>.<name>_v`` (``torch.nn.utils.weight_norm``)
``torch-new``   ``<module>.parametrizations.<name>.original0`` (g) and ``original1`` (v)
                (``torch.nn.utils.parametrizations.weight_norm``)
``wnorm``       the ``torch-old`` key names, with any ``dim`` (wnorm's ConvTranspose default is
                1, the output channels; PyTorch's default is always 0)
==============  =====================================================================

g is stored kept-dim (``(out, 1, 1)`` for a Conv1d normalized along dim 0, a 0-dim scalar for a
whole-tensor norm), so the axis a checkpoint was normalized along is read off g's shape: the one
axis where g has v's size. :func:`load_state_dict` loads any of them into a model whose layers
wnorm normalizes (or not), :func:`convert_state_dict` rewrites a state dict from one layout to
another without the model's code, and :func:`load_checkpoint`/:func:`save_checkpoint` read and
write ``.pt``/``.pth`` and ``.safetensors`` files.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .errors import WnormError
from ._pytorch_wn import find as _find_torch_wn

__all__ = [
    "FORMATS",
    "IncompatibleKeys",
    "load_state_dict",
    "incompatible_keys",
    "convert_state_dict",
    "convert_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "find_state_dicts",
]

Format = Literal["plain", "torch-old", "torch-new", "wnorm"]

#: The layouts :func:`convert_state_dict` writes.
FORMATS: tuple[str, ...] = ("plain", "torch-old", "torch-new", "wnorm")

_NEW = ".parametrizations."  # torch-new: <prefix>parametrizations.<name>.original0 / original1


class IncompatibleKeys(NamedTuple):
    """Keys of the model the state dict lacks, and keys of the state dict the model lacks."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# --------------------------------------------------------------------------- reading layouts
@dataclass
class _Src:
    """One weight of a state dict, whatever its layout: ``w`` alone, or the pair ``(g, v)``."""

    keys: tuple[str, ...]  # its keys in the state dict (one, or g's then v's)
    w: Any = None  # plain: the tensor (or, for _extra_state, any object)
    g: Tensor | None = None
    v: Tensor | None = None

    @property
    def pair(self) -> bool:
        return self.v is not None

    @property
    def shape(self) -> tuple[int, ...] | None:
        t = self.v if self.pair else self.w
        return tuple(t.shape) if isinstance(t, Tensor) else None


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


def _read(state_dict: Mapping[str, Any]) -> dict[str, _Src]:
    """Group a state dict by weight: canonical key (``a.weight``) -> :class:`_Src`, in order.

    One weight held in two layouts (``a.weight`` beside ``a.weight_g``/``a.weight_v``, or
    torch-old keys beside torch-new ones) is an error: which one is meant cannot be told."""
    if not isinstance(state_dict, Mapping):
        raise WnormError(f"expected a state dict (a mapping of names to tensors); got "
                         f"{type(state_dict).__name__}")
    out: dict[str, _Src] = {}

    def put(base: str, src: _Src) -> None:
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
            raise WnormError(
                f"state dict entry '{key}' is a {type(value).__name__}, not a tensor; a nested "
                f"checkpoint? pass the state dict inside it (e.g. checkpoint[{key!r}])"
            )
        new = _split_new(key)
        if new is not None:
            base, role = new
            other = key[:-1] + ("1" if role == "0" else "0")
            if other in state_dict:
                if role == "0":
                    put(base, _Src((key, other), g=value, v=state_dict[other]))
                continue
        if key.endswith(("_g", "_v")) and len(key) > 2:
            base, role = key[:-2], key[-1]
            other = base + ("_v" if role == "g" else "_g")
            if other in state_dict:
                if role == "g":
                    put(base, _Src((key, other), g=value, v=state_dict[other]))
                continue
        put(key, _Src((key,), w=value))
    return out


def _source_dim(key: str, g: Tensor, v: Tensor) -> int | None:
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


def _norm(w: Tensor, dim: int | None) -> Tensor:
    """:math:`\\lVert w\\rVert` over every axis but ``dim``, kept-dim (a scalar for None)."""
    if dim is None:
        return torch.linalg.vector_norm(w)
    axes = [d for d in range(w.dim()) if d != dim]
    return torch.linalg.vector_norm(w, dim=axes, keepdim=True) if axes else w.abs()


def _wide(t: Tensor) -> Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float64))


def _weight(src: _Src, dtype: torch.dtype | None = None, where: str = "") -> Tensor:
    """:math:`w = g\\,v/\\lVert v\\rVert` of a pair, computed in float64 and returned in
    ``dtype`` (default: v's), never through a narrower dtype on the way.

    ``where`` says for what the weight is computed, for the overflow error."""
    assert src.g is not None and src.v is not None
    dim = _source_dim(src.keys[0], src.g, src.v)
    g, v = _wide(src.g), _wide(src.v)
    norm = _norm(v, dim)
    if bool((norm == 0).any()):
        zero = (norm == 0).flatten().nonzero().flatten().tolist()
        raise WnormError(
            f"'{src.keys[1]}': {len(zero)} slices have zero norm (indices {zero[:10]}); "
            "w = g * v / ||v|| is undefined there; expected a nonzero v in every slice"
        )
    g = g.reshape(norm.shape) if g.numel() == norm.numel() else g
    return _cast(src.keys[1], v * (g / norm), dtype or src.v.dtype,
                 f" of w = g * v / ||v||{where}")


def _cast(key: str, t: Any, dtype: torch.dtype, what: str = "") -> Any:
    """``t`` in ``dtype``, refused (naming ``key``) where a finite value overflows it.

    Anything but a floating-point or complex tensor is returned as it is."""
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        return t
    out = t.detach().to(dtype)
    if out.is_floating_point() or out.is_complex():
        finite = torch.isfinite(out)
        if not bool(finite.all()):
            big = float(t.detach().abs().max())
            raise WnormError(
                f"'{key}': {int((~finite).sum())} of {t.numel()} values{what} overflow {dtype} "
                f"(largest |value| {big:.3g}); expected values that fit {dtype}: use a wider "
                "dtype (or rescale the weight)"
            )
    return out


def _check_finite(key: str, t: Any) -> None:
    if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WnormError(
                f"'{key}': expected finite values; got {bad} NaN/inf of {t.numel()}"
            )


# --------------------------------------------------------------------------- the target model
@dataclass
class _Slot:
    """One weight of the model: a plain key, or a (g, v) pair normalized along ``dim``."""

    keys: tuple[str, ...]
    tensors: tuple[Any, ...]  # the model's current values, for shapes and dtypes
    dim: int | None = None

    @property
    def pair(self) -> bool:
        return len(self.keys) == 2


def _pair_dims(model: nn.Module) -> dict[str, int | None]:
    """Canonical key -> normalization axis of every weight-normalized parameter of ``model``
    (by wnorm, by ``torch.nn.utils.weight_norm`` or by its parametrization)."""
    dims: dict[str, int | None] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for pname, spec in module.__dict__.get("_wn", {}).items():
            if spec.map.kind == "wn":  # other kinds (centered, ...) load only their own layout
                dims[prefix + pname] = spec.map.dim
        for pname, _, dim in _find_torch_wn(module):
            dims[prefix + pname] = dim
    return dims


def _target(model: nn.Module) -> dict[str, _Slot]:
    state = model.state_dict(keep_vars=True)
    try:
        grouped = _read(state)
    except WnormError as e:
        raise WnormError(f"the model ({type(model).__name__}): {e}") from None
    dims = _pair_dims(model)
    slots: dict[str, _Slot] = {}
    for ckey, src in grouped.items():
        if src.pair and ckey in dims:
            slots[ckey] = _Slot(src.keys, (src.g, src.v), dims[ckey])
        else:
            for key in src.keys:
                slots[key if src.pair else ckey] = _Slot((key,), (state[key],))
    return slots


def _same_kind(want: Tensor, got: Tensor) -> bool:
    def kind(t: Tensor) -> str:
        if t.is_complex():
            return "complex"
        if t.is_floating_point():
            return "float"
        return "bool" if t.dtype == torch.bool else "int"

    return kind(want) == kind(got)


# --------------------------------------------------------------------------- wrappers
#: Key prefixes of wrapped models: DistributedDataParallel/DataParallel, torch.compile.
_WRAPPERS = ("module.", "_orig_mod.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel/DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, whose keys carry no wrapper prefix."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything compiled
    compiled = getattr(eval_frame, "OptimizedModule", ())
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def _wrapper_prefix(keys: Iterable[str]) -> str:
    """The chain of wrapper prefixes (e.g. ``module.``) that every key starts with."""
    keys = list(keys)
    prefix = ""
    while keys:
        step = next((p for p in _WRAPPERS if all(k.startswith(prefix + p) for k in keys)), None)
        if step is None:
            break
        prefix += step
    return prefix


def _base(key: str) -> str:
    """The weight a key belongs to, whatever its layout (``a.weight_g`` -> ``a.weight``)."""
    new = _split_new(key)
    if new is not None:
        return new[0]
    return key[:-2] if key.endswith(("_g", "_v")) else key


def _align_prefix(
    state_dict: Mapping[str, Any], model_keys: Iterable[str]
) -> tuple[Mapping[str, Any], str]:
    """The state dict with its keys' wrapper prefix replaced by the model's, when the two
    differ and the replacement matches more of the model's weights; and a note saying what was
    done ("" when nothing was)."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        return state_dict, ""  # _read says what is wrong with it
    model_keys = list(model_keys)
    have, want = _wrapper_prefix(state_dict), _wrapper_prefix(model_keys)
    if have == want:
        return state_dict, ""
    renamed = {want + k[len(have):]: v for k, v in state_dict.items()}
    target = {_base(k) for k in model_keys}
    if len({_base(k) for k in renamed} & target) <= len({_base(k) for k in state_dict} & target):
        return state_dict, ""
    if not want:
        note = f"the state dict's keys were read without their '{have}' prefix"
    elif not have:
        note = f"the state dict's keys were read with the model's '{want}' prefix"
    else:
        note = f"the state dict's keys were read with '{want}' in place of '{have}'"
    return renamed, note


def _plan(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> tuple[dict[str, Any], IncompatibleKeys, str]:
    """Validate everything and compute the values to load, in the keys of ``model`` (already
    unwrapped), reading the state dict's keys past a wrapper prefix the model lacks (or the
    reverse).

    Returns ``(values, incompatible, note)``, the note saying how the keys were read (""
    when as they are); touches nothing on the model.
    """
    state_dict, note = _align_prefix(state_dict, model.state_dict().keys())
    try:
        values, bad = _plan_aligned(model, state_dict)
    except WnormError as e:
        if note:
            raise WnormError(f"{e} ({note})") from None
        raise
    return values, bad, note


def _plan_aligned(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> tuple[dict[str, Any], IncompatibleKeys]:
    """:func:`_plan` once the keys are aligned: ``(values, incompatible)``."""
    sources = _read(state_dict)
    slots = _target(model)
    for ckey, src in list(sources.items()):
        if src.pair and ckey not in slots and all(k in slots for k in src.keys):
            # the model has plain parameters that merely end in _g and _v: keep them apart
            del sources[ckey]
            for key, t in zip(src.keys, (src.g, src.v)):
                sources[key] = _Src((key,), w=t)
    values: dict[str, Any] = {}
    missing = [k for ckey, slot in slots.items() if ckey not in sources for k in slot.keys]
    unexpected = [k for ckey, src in sources.items() if ckey not in slots for k in src.keys]
    for ckey, slot in slots.items():
        src = sources.get(ckey)
        if src is None:
            continue
        for key, t in zip(src.keys, (src.g, src.v) if src.pair else (src.w,)):
            _check_finite(key, t)
        want = slot.tensors[-1]  # the weight's shape is v's (pairs) or the tensor's (plain)
        got = src.v if src.pair else src.w
        if not isinstance(want, Tensor) or not isinstance(got, Tensor):
            values[slot.keys[0]] = got  # _extra_state: passed through as is
            continue
        if tuple(got.shape) != tuple(want.shape):
            raise WnormError(
                f"'{src.keys[-1]}': expected shape {tuple(want.shape)} (for '{slot.keys[-1]}' "
                f"of the model); got {tuple(got.shape)}"
            )
        if not _same_kind(want, got):
            raise WnormError(
                f"'{src.keys[-1]}': expected a tensor of dtype like {want.dtype} (for "
                f"'{slot.keys[-1]}' of the model); got {got.dtype}"
            )
        # every value is computed wide and cast once, to the model's own dtype: a float16
        # checkpoint loads exactly into a float32 model, and what overflows is refused
        into = f" for the model's '{slot.keys[-1]}'"
        if not slot.pair:
            if src.pair:
                values[slot.keys[0]] = _weight(src, want.dtype, into)
            else:
                values[slot.keys[0]] = _cast(src.keys[0], src.w, want.dtype, into)
            continue
        g_want = slot.tensors[0]
        if src.pair and tuple(src.g.shape) == tuple(g_want.shape):
            # same layout: copy as is (keeps the training state)
            if not _same_kind(g_want, src.g):
                raise WnormError(
                    f"'{src.keys[0]}': expected a tensor of dtype like {g_want.dtype}; "
                    f"got {src.g.dtype}"
                )
            g = _cast(src.keys[0], src.g, g_want.dtype, f" for the model's '{slot.keys[0]}'")
            v = _cast(src.keys[1], src.v, want.dtype, into)
            norm = _norm(_wide(v), slot.dim)
        else:
            if src.pair:
                v = _weight(src, want.dtype, into)
            else:
                v = _cast(src.keys[0], src.w, want.dtype, into)
            norm = _norm(_wide(v), slot.dim)
            g = _cast(src.keys[-1], norm, g_want.dtype,
                      f" of ||w|| for the model's '{slot.keys[0]}'")
        zero = (norm == 0).flatten().nonzero().flatten().tolist()
        if zero:
            along = "" if slot.dim is None else f" along dim {slot.dim}"
            raise WnormError(
                f"'{src.keys[-1]}': {len(zero)} of {norm.numel()} slices{along} have zero norm "
                f"(indices {zero[:10]}); '{slot.keys[-1]}' is weight-normalized and expected a "
                "nonzero direction in every slice"
            )
        values[slot.keys[0]], values[slot.keys[1]] = g, v
    return values, IncompatibleKeys(missing, unexpected)


# --------------------------------------------------------------------------- public: loading
def incompatible_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> IncompatibleKeys:
    """What :func:`load_state_dict` would report: the model's keys the state dict lacks and the
    state dict's keys the model lacks, after matching layouts. Loads nothing.

    Raises:
        WnormError: the state dict is not one (non-tensor values), or a weight in it is invalid
            (wrong shape, NaN/inf, overflow of the model's dtype, zero-norm slices where the
            model normalizes, two layouts of one weight).

    Example:
        >>> import torch, wnorm
        >>> from wnorm.checkpoint import incompatible_keys
        >>> net = wnorm.weight_norm(torch.nn.Linear(3, 2))
        >>> incompatible_keys(net, {"weight": torch.ones(2, 3)})
        IncompatibleKeys(missing_keys=['bias'], unexpected_keys=[])
    """
    return _plan(_unwrap(model), state_dict)[1]


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> nn.Module:
    r"""Load a state dict saved in any weight-norm layout into ``model``: same outputs after.

    Each weight is matched by name whatever its layout (plain ``w``; ``_g``/``_v``;
    ``parametrizations.<name>.original0/1``). When the checkpoint's ``(g, v)`` have the model's
    shapes they are copied as they are (the training state is kept); otherwise the weight
    :math:`w = g\,v/\lVert v\rVert` is computed along the checkpoint's own axis (read off g's
    shape), and a normalized target gets :math:`g = \lVert w\rVert` along its axis, ``v = w``;
    a plain target gets ``w``. So a PyTorch ConvTranspose checkpoint (normalized per input
    channel) loads into wnorm's per-output-channel layers. Buffers load as usual.

    Computed values (w, g) are computed in float64 and every value is cast once, to the
    model's own dtype: a bfloat16 checkpoint loads into a float32 model without being rounded
    to bfloat16 on the way, and a value that overflows the model's dtype (e.g. a g past 65504
    for a float16 model) is an error.

    A model wrapped by DistributedDataParallel/DataParallel or ``torch.compile`` is loaded
    through its ``.module``/``._orig_mod``; a state dict whose every key carries a ``module.``
    or ``_orig_mod.`` prefix the model's keys lack (or the reverse) is read past it.

    Everything is validated before the model is touched: on error the model is unchanged.

    Args:
        model: the model to load into (wnorm-normalized, PyTorch-normalized or plain layers).
        state_dict: the checkpoint's state dict (not a dict nesting one: see
            :func:`find_state_dicts`).
        strict: when True (default), keys the model lacks or the state dict lacks are an error;
            when False, what matches is loaded and the rest is reported with a warning (see
            :func:`incompatible_keys` for the lists).

    Returns:
        The same model.

    Raises:
        WnormError: missing or unexpected keys (strict), a shape or dtype kind that differs from
            the model's, NaN/inf values, a value that overflows the model's dtype, zero-norm
            slices (where the model normalizes), a g whose axis cannot be read off its shape,
            one weight held in two layouts, or a value that is not a tensor; the message names
            the key.

    Example:
        >>> import torch, wnorm
        >>> from wnorm.checkpoint import load_state_dict
        >>> old = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(4, 3, 5))  # dim 0
        >>> new = wnorm.weight_norm(torch.nn.ConvTranspose1d(4, 3, 5))  # dim 1
        >>> new = load_state_dict(new, old.state_dict())
        >>> x = torch.randn(1, 4, 7)
        >>> torch.allclose(new(x), old(x), atol=1e-6)
        True
    """
    inner = _unwrap(model)
    values, bad, note = _plan(inner, state_dict)
    note = f" ({note})" if note else ""
    if strict and (bad.missing_keys or bad.unexpected_keys):
        parts = []
        if bad.missing_keys:
            parts.append(f"missing keys {bad.missing_keys}")
        if bad.unexpected_keys:
            parts.append(f"unexpected keys {bad.unexpected_keys}")
        raise WnormError(
            f"load_state_dict into {type(inner).__name__}: expected the model's keys (in any "
            f"weight-norm layout); got {' and '.join(parts)}{note}"
        )
    if bad.missing_keys or bad.unexpected_keys:
        warnings.warn(
            f"load_state_dict into {type(inner).__name__} (strict=False): not loaded: missing "
            f"keys {bad.missing_keys}, unexpected keys {bad.unexpected_keys}{note}",
            stacklevel=2,
        )
    with torch.no_grad():
        inner.load_state_dict(values, strict=False)
    return model


# --------------------------------------------------------------------------- public: converting
def _convert(state_dict: Mapping[str, Any], to: str) -> tuple[dict[str, Any], int]:
    if to not in FORMATS:
        raise WnormError(f"convert: expected 'to' in {list(FORMATS)}; got {to!r}")
    sources = _read(state_dict)
    for src in sources.values():
        for key, t in zip(src.keys, (src.g, src.v) if src.pair else (src.w,)):
            _check_finite(key, t)
    any_pair = any(src.pair for src in sources.values())
    out: dict[str, Any] = {}
    n = 0
    for ckey, src in sources.items():
        if to == "plain":
            if src.pair:
                out[ckey] = _weight(src)
                n += 1
            else:
                out[ckey] = src.w
            continue
        if src.pair:
            dim = _source_dim(src.keys[0], src.g, src.v)  # reject a g no loader could read
            g, v = src.g, src.v
            changed = src.keys[0] != _pair_keys(ckey, to)[0]
            if to != "wnorm":  # PyTorch's own layout: what its default weight_norm loads
                g, v, recomputed = _torch_layout(src, dim)
                changed = changed or recomputed
            n += changed
        elif not any_pair and _normalizable(ckey, src.w):
            g, v = _rows_normalized(ckey, src.w, src.w.dtype), src.w
            n += 1
        else:
            out[ckey] = src.w
            continue
        gk, vk = _pair_keys(ckey, to)
        out[gk], out[vk] = g, v
    return out, n


def _torch_layout(src: _Src, dim: int | None) -> tuple[Tensor, Tensor, bool]:
    """``(g, v, changed)`` of a pair in a layout PyTorch's weight_norm loads: dim 0, g kept-dim
    ``(out, 1, ...)`` (its default), or a 0-dim g (its ``dim=None``).

    A pair normalized along another axis (wnorm's ConvTranspose layout, g of shape
    ``(1, out, 1...)``) becomes ``g = ||w||`` per row and ``v = w``: the same weight. A squeezed
    g along dim 0 gets its kept-dim shape."""
    assert src.g is not None and src.v is not None
    g, v = src.g, src.v
    kept = (v.shape[0],) + (1,) * (v.dim() - 1)
    if g.dim() == 0 or tuple(g.shape) == kept:
        return g, v, False
    if dim == 0:
        return g.reshape(kept), v, True
    v = _weight(src)  # w, computed in float64, in v's dtype
    return _rows_normalized(src.keys[1], v, g.dtype), v, True


def _rows_normalized(key: str, w: Tensor, g_dtype: torch.dtype) -> Tensor:
    """g of ``w`` in PyTorch's default layout (dim 0, kept-dim): each row's norm, computed in
    float64 and cast to ``g_dtype``; refused when a row is zero or its norm overflows."""
    norm = _norm(_wide(w), 0)
    if bool((norm == 0).any()):
        raise WnormError(
            f"'{key}': expected a nonzero norm in every row to normalize it along dim 0; got "
            f"{int((norm == 0).sum())} zero rows"
        )
    return _cast(key, norm, g_dtype, " of ||w|| along dim 0")


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


def convert_state_dict(state_dict: Mapping[str, Any], to: Format) -> dict[str, Any]:
    r"""Rewrite a state dict in another weight-norm layout, without the model's code.

    Every pair ``(g, v)`` in either PyTorch layout (``_g``/``_v`` or
    ``parametrizations.<name>.original0/1``) is found by its key names.

    - ``"plain"``: each pair becomes :math:`w = g\,v/\lVert v\rVert` (along the axis read off
      g's shape).
    - ``"torch-old"``, ``"torch-new"``: what PyTorch's own ``weight_norm`` (default ``dim=0``)
      loads. Pairs normalized along dim 0 (or the whole tensor: a 0-dim g, PyTorch's
      ``dim=None``) are renamed, values untouched. A pair normalized along another axis
      (wnorm's ConvTranspose layout, g of shape ``(1, out, 1...)``) is rewritten along dim 0:
      :math:`g = \lVert w\rVert` per row, ``v = w`` (the same weight; g and v themselves are
      not kept: use ``"wnorm"`` for that). From a state dict with no pair at all (a plain one),
      every tensor whose last name part starts with ``weight`` and that has 2 or more axes is
      normalized along dim 0 the same way; BatchNorm/LayerNorm weights (1-D) and biases stay
      plain. A state dict with some pairs keeps its plain weights plain.
    - ``"wnorm"``: the ``torch-old`` key names, every pair as it is, along any axis (wnorm's
      loader reads the axis off g's shape).

    Norms and weights are computed in float64 and written in the state dict's own dtypes.

    Round trips keep the computed weights: ``plain`` of any conversion equals ``plain`` of the
    input up to rounding.

    Args:
        state_dict: the state dict (names to tensors).
        to: one of :data:`FORMATS`.

    Returns:
        A new dict; the input is not changed (untouched tensors are shared, not copied).

    Raises:
        WnormError: ``to`` is unknown, a value is not a tensor, a tensor has NaN/inf, a g's axis
            cannot be read off its shape, a weight to normalize along dim 0 has a zero row, a
            computed g or w overflows its dtype (e.g. a float16 row norm past 65504), or one
            weight is held in two layouts.

    Example:
        >>> import torch
        >>> from wnorm.checkpoint import convert_state_dict
        >>> sd = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2)).state_dict()
        >>> list(convert_state_dict(sd, "torch-old"))
        ['bias', 'weight_g', 'weight_v']
        >>> w = convert_state_dict(sd, "plain")["weight"]
        >>> torch.allclose(w, sd["parametrizations.weight.original1"])
        True
    """
    return _convert(state_dict, to)[0]


# --------------------------------------------------------------------------- public: files
_NESTS = ("state_dict", "model", "model_state_dict", "generator", "net", "module", "ema")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def find_state_dicts(checkpoint: Any, key: str | None = None) -> list[tuple[str, ...]]:
    """Where the state dicts are in a checkpoint: a list of key paths (``()`` for a bare one).

    A checkpoint is a state dict (names to tensors) or a dict nesting some, e.g. under
    ``"state_dict"``, ``"model"`` or ``"generator"`` (searched two levels deep); ``key`` picks one
    top-level entry.

    Raises:
        WnormError: ``key`` is not in the checkpoint or is not a state dict, or there is no
            state dict at all.

    Example:
        >>> import torch
        >>> from wnorm.checkpoint import find_state_dicts
        >>> sd = torch.nn.Linear(2, 2).state_dict()
        >>> find_state_dicts({"epoch": 3, "model": sd, "opt": {"lr": 0.1}})
        [('model',)]
    """
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            have = list(checkpoint) if isinstance(checkpoint, Mapping) else []
            raise WnormError(f"expected key {key!r} in the checkpoint; got keys {have}")
        if not _is_state_dict(checkpoint[key]):
            raise WnormError(
                f"checkpoint[{key!r}]: expected a state dict (names to tensors); got "
                f"{type(checkpoint[key]).__name__}"
            )
        return [(key,)]
    if _is_state_dict(checkpoint):
        return [()]
    found: list[tuple[str, ...]] = []

    def walk(obj: Any, path: tuple[str, ...]) -> None:
        if not isinstance(obj, Mapping) or len(path) > 2:
            return
        for k, v in obj.items():
            if not isinstance(k, str):
                continue
            if _is_state_dict(v):
                found.append(path + (k,))
            else:
                walk(v, path + (k,))

    walk(checkpoint, ())
    # the conventional names first, in _NESTS order, then the rest in file order
    found.sort(key=lambda p: _NESTS.index(p[0]) if p[0] in _NESTS else len(_NESTS))
    if not found:
        raise WnormError(
            "expected a state dict (names to tensors) or a dict nesting one (e.g. under "
            f"{list(_NESTS[:3])}); got {type(checkpoint).__name__}"
            + (f" with keys {list(checkpoint)[:10]}" if isinstance(checkpoint, Mapping) else "")
        )
    return found


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _with(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``obj`` (shallow along ``path``) with ``value`` at ``path``."""
    if not path:
        return value
    new = dict(obj)
    new[path[0]] = _with(obj[path[0]], path[1:], value)
    return new


def convert_checkpoint(
    checkpoint: Any, to: Format, key: str | None = None
) -> tuple[Any, int]:
    """:func:`convert_state_dict` on every state dict in ``checkpoint`` (or ``checkpoint[key]``),
    the other entries kept. Returns ``(new_checkpoint, weights_converted)``."""
    out, total = checkpoint, 0
    for path in find_state_dicts(checkpoint, key):
        where = "".join(f"[{p!r}]" for p in path)
        try:
            sd, n = _convert(_get(checkpoint, path), to)
        except WnormError as e:
            raise WnormError(f"checkpoint{where}: {e}") from None
        out = _with(out, path, sd)
        total += n
    return out, total


def _safetensors(path: Path) -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        raise WnormError(
            f"{path}: reading and writing .safetensors files needs the safetensors package; "
            "pip install safetensors"
        ) from None
    return st


def load_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file: ``.safetensors`` (a flat state dict), otherwise ``torch.load``
    with ``weights_only=True`` (``.pt``/``.pth``: a state dict or a dict nesting one).

    Tensors are loaded on the CPU.

    Returns:
        What the file holds (check it with :func:`find_state_dicts`).

    Raises:
        WnormError: the file does not exist, is not a checkpoint (not a torch or safetensors
            file, or holds no state dict), or safetensors is not installed; the message names
            the file.

    Example:
        >>> import tempfile, os, torch
        >>> from wnorm.checkpoint import load_checkpoint, save_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> save_checkpoint({"model": torch.nn.Linear(2, 1).state_dict(), "step": 7}, path)
        >>> sorted(load_checkpoint(path)["model"])
        ['bias', 'weight']
    """
    path = Path(path)
    _check_input(path)
    if path.suffix == ".safetensors":
        st = _safetensors(path)
        try:
            obj: Any = st.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WnormError(f"{path}: not a readable safetensors file; got {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling, zip and format errors all mean "not a checkpoint"
            blocker = _weights_only_blocker(e)
            if blocker is not None:
                raise WnormError(
                    f"{path}: not a PyTorch checkpoint readable with weights_only=True (which "
                    f"keeps a file from running code): it holds an object of a type torch.load "
                    f"refuses ({blocker}); if you trust its source, load it with "
                    f"torch.load({str(path)!r}, weights_only=False), torch.save only its state "
                    f"dict (e.g. checkpoint['model']) and convert that file"
                ) from None
            raise WnormError(
                f"{path}: not a PyTorch checkpoint readable with weights_only=True; got "
                f"{_first_line(e)}"
            ) from None
    try:
        find_state_dicts(obj)
    except WnormError as e:
        raise WnormError(f"{path}: not a checkpoint: {e}") from None
    return obj


def save_checkpoint(
    obj: Any, path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a checkpoint: ``.safetensors`` for a flat state dict (tensors only), otherwise
    ``torch.save``.

    The file is written beside ``path`` under a temporary name and then renamed into place, so
    a write that fails (disk full, interrupted) leaves no half-written file and keeps the file
    that was at ``path`` before.

    Args:
        obj: a state dict, or (not for ``.safetensors``) a dict nesting some.
        path: the file to write; its suffix picks the format.
        metadata: the ``.safetensors`` header's string metadata (e.g. ``{"format": "pt"}``);
            only for ``.safetensors`` files.

    Raises:
        WnormError: a ``.safetensors`` target for something that is not a flat state dict of
            tensors, metadata that is not names to strings or is for another format,
            safetensors is not installed, or the file cannot be written (``path`` is a
            directory, its directory does not exist, no permission, disk full); the message
            names ``path``.
    """
    path = Path(path)
    _check_output(path)
    if path.suffix != ".safetensors":
        if metadata is not None:
            raise WnormError(f"{path}: metadata is written to .safetensors files only; got a "
                             f"{path.suffix or 'suffix-less'} file")
        _write_atomically(path, lambda tmp: torch.save(obj, tmp))
        return
    st = _safetensors(path)
    if not _is_state_dict(obj) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WnormError(
            f"{path}: a .safetensors file holds a flat state dict (names to tensors); got "
            f"{type(obj).__name__}"
            + (f" with keys {list(obj)[:10]}" if isinstance(obj, Mapping) else "")
            + "; pick the state dict (wnorm convert --key KEY) or write a .pt file"
        )
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise WnormError(f"{path}: expected metadata of names to strings; got {metadata!r}")
        metadata = dict(metadata)
    # safetensors refuses shared or non-contiguous storage: give it one copy per tensor
    flat = {k: v.detach().contiguous().clone() for k, v in obj.items()}
    _write_atomically(path, lambda tmp: st.save_file(flat, tmp, metadata=metadata))


def _safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The string metadata in a ``.safetensors`` file's header (None when it has none)."""
    path = Path(path)
    _safetensors(path)  # says how to install it when it is missing
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:  # safetensors raises its own error types
        raise WnormError(f"{path}: not a readable safetensors file; got {_first_line(e)}") from None


# --------------------------------------------------------------------------- files: helpers
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal escape codes."""
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _weights_only_blocker(e: BaseException) -> str | None:
    """What made ``torch.load(weights_only=True)`` refuse a file, from torch's message: e.g.
    ``Unsupported global: GLOBAL argparse.Namespace``; None for other errors."""
    text = _ANSI.sub("", str(e))
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return found.group(0)
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip().rstrip(".") if found else "torch names no type"


def _check_input(path: Path) -> None:
    """Refuse a checkpoint path that is not a readable regular file, naming it."""
    if path.is_dir():
        raise WnormError(f"{path}: expected a checkpoint file; got a directory")
    if not path.is_file():
        got = "no such file" if not path.exists() else "not a regular file"
        raise WnormError(f"{path}: expected a checkpoint file; got {got}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise WnormError(f"{path}: expected a readable checkpoint file; got "
                         f"{e.strerror or _first_line(e)}") from None


def _check_output(path: Path) -> None:
    """Refuse an output path that cannot become a file: a directory, or in a missing directory."""
    if path.is_dir():
        raise WnormError(f"{path}: expected a file name to write; got a directory")
    parent = path.parent
    if not parent.is_dir():
        got = "no such directory" if not parent.exists() else "not a directory"
        raise WnormError(f"{path}: expected an existing directory '{parent}' to write into; "
                         f"got {got}")


def _temporary_beside(dest: Path) -> Path:
    """Create an empty file with a new name in ``dest``'s directory (mode as the umask says)."""
    while True:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. Through a
    symbolic link, the file it points to is replaced (the link stays).
    """
    dest = Path(os.path.realpath(path))
    try:
        tmp = _temporary_beside(dest)
    except OSError as e:
        raise WnormError(f"{path}: cannot write a file there; got "
                         f"{e.strerror or _first_line(e)}") from None
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:  # on disk before the rename: no empty file after a crash
            os.fsync(f.fileno())
        if dest.exists():
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, WnormError):
            kept = "the file there before is kept" if dest.exists() else "no file written"
            raise WnormError(f"{path}: writing failed ({kept}); got {_first_line(e)}") from None
        raise
