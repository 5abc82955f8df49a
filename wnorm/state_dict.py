r"""State dicts across weight-norm layouts: load any of them into a model, rewrite one as another.

A weight :math:`w = g\,v/\lVert v\rVert` is stored plain (``w``), in PyTorch's old layout
(``<name>_g``/``<name>_v``), its new one (``parametrizations.<name>.original0/1``) or wnorm's
(the old key names, any axis); :func:`load_state_dict` loads any of them into a model whatever
its layers use, and :func:`convert_state_dict` rewrites a state dict without the model's code.
Files and the ``wnorm convert`` command live in :mod:`wnorm.cli`.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from . import _layouts as lay
from . import _slot
from ._pytorch_wn import find
from .errors import WnormError, expect_module, refuse_sharded
from .maps import METHODS, OTHER_MAP, kind_mismatch

__all__ = ["load_state_dict", "convert_state_dict"]

Format = Literal["plain", "torch-old", "torch-new", "wnorm"]


class _Incompatible(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]
    halves: list[str]  # "'a.weight_g' without its other half 'a.weight_v' (...)"


# --------------------------------------------------------------------------- the target model
@dataclass
class _Slot:
    """One weight of the model: a plain key, or a (g, v) pair normalized along ``dim``."""

    keys: tuple[str, ...]
    tensors: tuple[Any, ...]  # the model's current values, for shapes and dtypes
    dim: int | None = None
    forced: Any = None  # a forced weight norm's map: v read from another layout goes on its sphere

    @property
    def pair(self) -> bool:
        return len(self.keys) == 2


def _pair_dims(model: nn.Module) -> dict[str, int | None]:
    """Canonical key -> normalization axis of every weight-normalized parameter of ``model``
    (by wnorm, by ``torch.nn.utils.weight_norm`` or by its parametrization; a forced weight
    norm with a learned g is weight norm's map)."""
    dims: dict[str, int | None] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for pname, spec in _slot.slots_of(module).items():
            # other kinds (centered, ...) load only their own layout
            if spec.kind == "wn" or (spec.kind == "forced" and spec.has_g):
                dims[prefix + pname] = spec.dim
        for found in find(module):
            dims[prefix + found.name] = found.dim
    return dims


def _target(model: nn.Module) -> dict[str, _Slot]:
    state = model.state_dict(keep_vars=True)
    try:
        grouped = lay.read(state)
    except WnormError as e:
        raise WnormError(f"the model ({type(model).__name__}): {e}") from None
    dims = _pair_dims(model)
    forced = {(f"{n}." if n else "") + p: s.map for n, m in model.named_modules(
        remove_duplicate=False) for p, s in _slot.slots_of(m).items() if s.kind == "forced"}
    slots: dict[str, _Slot] = {}
    for ckey, src in grouped.items():
        if src.pair and ckey in dims:
            slots[ckey] = _Slot(src.keys, (src.g, src.v), dims[ckey], forced.get(ckey))
        else:
            for key in src.keys:
                slots[key if src.pair else ckey] = _Slot((key,), (state[key],))
    return slots


def _filled_by_loader(model: nn.Module, key: str, metadata: Any) -> bool:
    """Whether ``key`` is a BatchNorm's ``num_batches_tracked`` that a checkpoint saved before
    PyTorch 0.4.1 lacks (no version 2 in its metadata): the layer's own loader keeps its count
    then, and torch's ``load_state_dict`` reports nothing missing."""
    path, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return False
    entry = metadata.get(path) if isinstance(metadata, Mapping) else None
    version = entry.get("version") if isinstance(entry, Mapping) else None
    return isinstance(module, nn.modules.batchnorm._NormBase) and (
        not isinstance(version, int) or version < 2)


def _same_kind(want: Tensor, got: Tensor) -> bool:
    def kind(t: Tensor) -> str:
        if t.is_complex():
            return "complex"
        if t.is_floating_point():
            return "float"
        return "bool" if t.dtype == torch.bool else "int"

    return kind(want) == kind(got)


def _unreachable(model: nn.Module) -> list[str]:
    """Parameters and persistent buffers of ``model`` that its own ``state_dict`` leaves out
    (a module that writes its own keys): no state dict can set them."""
    keys = set(model.state_dict(keep_vars=True))
    out = []
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        skip = module.__dict__.get("_non_persistent_buffers_set", set())
        names = [n for n, p in module._parameters.items() if p is not None]
        names += [n for n, b in module._buffers.items() if b is not None and n not in skip]
        out += [prefix + n for n in names if prefix + n not in keys]
    return out


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


def _align_prefix(
    state_dict: Mapping[str, Any], model_keys: Iterable[str]
) -> tuple[Mapping[str, Any], str]:
    """The state dict with its keys' wrapper prefix replaced by the model's, when the two
    differ and the replacement matches more of the model's weights; and a note saying what was
    done ("" when nothing was)."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        return state_dict, ""  # read() says what is wrong with it
    model_keys = list(model_keys)
    have, want = _wrapper_prefix(state_dict), _wrapper_prefix(model_keys)
    if have == want:
        return state_dict, ""
    renamed = {want + k[len(have):]: v for k, v in state_dict.items()}

    def bases(keys: Iterable[str]) -> set[str]:
        return {lay.base_and_role(k)[0] for k in keys}

    target = bases(model_keys)
    if len(bases(renamed) & target) <= len(bases(state_dict) & target):
        return state_dict, ""
    if not want:
        note = f"the state dict's keys were read without their '{have}' prefix"
    elif not have:
        note = f"the state dict's keys were read with the model's '{want}' prefix"
    else:
        note = f"the state dict's keys were read with '{want}' in place of '{have}'"
    return renamed, note


# --------------------------------------------------------------------------- planning
def _check_kinds(model: nn.Module, state_dict: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Refuse (g, v) that the state dict's metadata says another map saved (a centered weight
    norm's, into a weight norm): the same shapes, another weight."""
    meta = getattr(state_dict, "_metadata", None)
    if not isinstance(meta, Mapping):
        return  # saved by PyTorch, an older wnorm, or rebuilt as a plain dict: nothing to read
    have, want = _wrapper_prefix(state_dict), _wrapper_prefix(keys)
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, entry in meta.items():
        full = f"{path}." if path else ""
        if not (isinstance(entry, Mapping) and "wnorm" in entry and full.startswith(have)):
            continue
        module = modules.get((want + full[len(have):])[:-1])
        if module is None:
            continue  # a key the model lacks: named with the others
        why = kind_mismatch(entry, {p: s.map for p, s in _slot.slots_of(module).items()},
                            state_dict, full)
        if why:
            raise WnormError(f"load_state_dict into {type(model).__name__}: {why}: "
                             f"{OTHER_MAP} (the model is as it was)")


def _plan(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> tuple[dict[str, Any], _Incompatible, str]:
    """Validate everything and compute the values to load, in the keys of ``model`` (already
    unwrapped), reading the state dict's keys past a wrapper prefix the model lacks (or the
    reverse).

    Returns ``(values, incompatible, note)``, the note saying how the keys were read (""
    when as they are); touches nothing on the model.
    """
    keys = model.state_dict().keys()
    _check_kinds(model, state_dict, keys)
    state_dict, note = _align_prefix(state_dict, keys)
    try:
        values, bad = _plan_aligned(model, state_dict)
    except WnormError as e:
        if note:
            raise WnormError(f"{e} ({note})") from None
        raise
    return values, bad, note


def _plan_aligned(
    model: nn.Module, state_dict: Mapping[str, Any]
) -> tuple[dict[str, Any], _Incompatible]:
    """:func:`_plan` once the keys are aligned: ``(values, incompatible)``."""
    sources = lay.read(state_dict)
    slots = _target(model)
    for ckey, src in list(sources.items()):
        if src.pair and ckey not in slots and all(k in slots for k in src.keys):
            # the model has plain parameters that merely end in _g and _v: keep them apart
            del sources[ckey]
            for key, t in zip(src.keys, (src.g, src.v)):
                sources[key] = lay.Src((key,), w=t)
    # half of a pair (g without v, or v without g) of a weight the model has: that weight is
    # not loaded (w = g v/||v|| needs both), and the key is named with its missing half
    halves: dict[str, list[str]] = {}
    for ckey, src in sources.items():
        base, role = lay.base_and_role(ckey)
        if ckey not in slots and role != "w" and base in slots and base not in sources:
            other = (ckey[:-1] + ("1" if ckey[-1] == "0" else "0") if ckey != base + "_" + role
                     else base + ("_v" if role == "g" else "_g"))
            halves.setdefault(base, []).append(f"'{ckey}' without its other half '{other}'")
    values: dict[str, Any] = {}
    meta = getattr(state_dict, "_metadata", None)
    # a tie (an embedding and an LM head sharing g and v) is loaded through whichever of its
    # names the state dict holds: safetensors' save_model and transformers' save_pretrained
    # write shared tensors once
    loaded = {id(t) for ckey, slot in slots.items() if ckey in sources for t in slot.tensors}
    missing = [k for ckey, slot in slots.items() if ckey not in sources and ckey not in halves
               and not all(isinstance(t, Tensor) and id(t) in loaded for t in slot.tensors)
               for k in slot.keys if not _filled_by_loader(model, k, meta)]
    unexpected = [k for ckey, src in sources.items() if ckey not in slots
                  and lay.base_and_role(ckey)[0] not in halves for k in src.keys]
    half_report = [f"{' and '.join(h)} (so the model's {list(slots[base].keys)} are not loaded)"
                   for base, h in halves.items()]
    for ckey, slot in slots.items():
        src = sources.get(ckey)
        if src is None:
            continue
        for key, t in zip(src.keys, (src.g, src.v) if src.pair else (src.w,)):
            lay.check_finite(key, t)
        want = slot.tensors[-1]  # the weight's shape is v's (pairs) or the tensor's (plain)
        got = src.v if src.pair else src.w
        if isinstance(want, Tensor) and nn.parameter.is_lazy(want):
            raise WnormError(
                f"'{slot.keys[-1]}' of the model is not initialized yet (a lazy module "
                "materializes it at its first forward); run one forward pass first, then load")
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
                values[slot.keys[0]] = lay.weight(src, want.dtype, into)
            else:
                values[slot.keys[0]] = lay.cast(src.keys[0], src.w, want.dtype, into)
            continue
        g_want = slot.tensors[0]
        same = src.pair and tuple(src.g.shape) == tuple(g_want.shape)
        if same:
            # same layout: copy as is (keeps the training state)
            if not _same_kind(g_want, src.g):
                raise WnormError(
                    f"'{src.keys[0]}': expected a tensor of dtype like {g_want.dtype}; "
                    f"got {src.g.dtype}"
                )
            g = lay.cast(src.keys[0], src.g, g_want.dtype, f" for the model's '{slot.keys[0]}'")
            v = lay.cast(src.keys[1], src.v, want.dtype, into)
            norm = lay.norm(lay.wide(v), slot.dim)
        else:
            if src.pair:
                v = lay.weight(src, want.dtype, into)
            else:
                v = lay.cast(src.keys[0], src.w, want.dtype, into)
            norm = lay.norm(lay.wide(v), slot.dim)
            g = lay.gain(src.keys[-1], v, slot.dim, g_want.dtype,
                         f" of ||w|| for the model's '{slot.keys[0]}'", norm)
        # a forced layer's v read from another layout (a pair under wnorm's own keys is kept
        # as it is) goes onto its sphere: the same weight
        if slot.forced is not None and not (same and tuple(src.keys) == tuple(slot.keys)) and \
                not bool((norm == 0).any()):
            v = (lay.wide(v) * (slot.forced.sphere(v) / norm)).to(want.dtype)
        zero = (norm == 0).flatten().nonzero().flatten().tolist()
        if zero:
            along = "" if slot.dim is None else f" along dim {slot.dim}"
            raise WnormError(
                f"'{src.keys[-1]}': {len(zero)} of {norm.numel()} slices{along} have zero norm "
                f"(indices {zero[:10]}); '{slot.keys[-1]}' is weight-normalized and expected a "
                "nonzero direction in every slice"
            )
        lay.check_computable(src.keys[-1], v, slot.dim)
        values[slot.keys[0]], values[slot.keys[1]] = g, v
    return values, _Incompatible(missing, unexpected, half_report)


# --------------------------------------------------------------------------- loading, checked
class _Snapshot(NamedTuple):
    """What a failed load puts back: every parameter and buffer as (its module's dict, name,
    object, a CPU copy), and the extra state of every module that keeps one."""

    tensors: list[tuple[dict, str, Tensor, Tensor]]
    extra: list[tuple[nn.Module, Any]]


def _snapshot(model: nn.Module) -> _Snapshot:
    """The copies live on the CPU: a GPU model need not fit twice in GPU memory."""
    seen: set[int] = set()
    out = _Snapshot([], [])
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or id(t) in seen or t.is_meta:
                    continue
                seen.add(id(t))
                out.tensors.append((store, name, t, t.detach().to("cpu", copy=True)))
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            out.extra.append((module, copy.deepcopy(module.get_extra_state())))
    return out


def _restore(saved: _Snapshot) -> None:
    with torch.no_grad():
        for store, name, t, old in saved.tensors:
            store[name] = t  # a load that replaced the object: put the original back
            t.copy_(old)
    for module, state in saved.extra:
        module.set_extra_state(state)


def _as_written(now: Any, want: Any) -> bool:
    """Whether the model's tensor ``now`` holds ``want`` (the value given to load)."""
    if not isinstance(want, Tensor):
        return True  # _extra_state: any object, taken by set_extra_state
    if not isinstance(now, Tensor) or now.is_meta != want.is_meta:
        return False
    if type(now) is not Tensor or now.is_meta:
        return True  # a tensor subclass (e.g. a sharded DTensor): torch's own report decides
    return torch.equal(now, want.to(device=now.device, dtype=now.dtype))


def _owner(model: nn.Module, key: str, method: str) -> str:
    """The module a state-dict key belongs to, and what in it handles keys its own way: its
    load_state_dict pre-hooks and the classes that override ``method``."""
    path = key.rpartition(".")[0]
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return ""
    cls = type(module)
    why = []
    hooks = []
    for hook in module._load_state_dict_pre_hooks.values():
        fn = getattr(hook, "hook", hook)  # torch wraps hooks; partials hold the function
        fn = getattr(fn, "func", fn)
        hooks.append(getattr(fn, "__qualname__", type(fn).__name__))
    if hooks and method == "_load_from_state_dict":
        why.append(f"load_state_dict pre-hooks {hooks}")
    owners = [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__
              if method in c.__dict__ and c is not nn.Module]
    if owners:
        why.append(f"{method} of {', '.join(dict.fromkeys(owners))}")
    where = f"'{path}' ({cls.__qualname__})" if path else cls.__qualname__
    return where + (": " + "; ".join(why) if why else "")


def _other_maps(model: nn.Module, bad: _Incompatible) -> list[str]:
    """Why a weight of a map other than weight norm's (centered, ...) is missing while the
    state dict holds it in another layout: its (g, v) come only from its own method's."""
    missing, unexpected = set(bad.missing_keys), set(bad.unexpected_keys)
    out = []
    for mname, module in model.named_modules():
        prefix = mname + "." if mname else ""
        for pname, spec in _slot.slots_of(module).items():
            if spec.kind == "wn" or (spec.kind == "forced" and spec.has_g) or (
                    prefix + spec.vname not in missing):
                continue
            held = [k for k in (prefix + pname, f"{prefix}parametrizations.{pname}.original1")
                    if k in unexpected]
            if held:
                out.append(f"(the model's '{prefix}{pname}' is a wnorm."
                           f"{METHODS.get(spec.kind, spec.kind)} weight, which cannot be loaded "
                           f"from '{held[0]}': its (g, v) come only from a checkpoint of the "
                           "same method; load that one into a model built with "
                           "wnorm.weight_norm or without weight norm)")
    return out


def _load_checked(model: nn.Module, values: dict[str, Any]) -> tuple[list[str], bool]:
    """Load ``values`` with the model's own ``load_state_dict``; return the keys it did not
    take as given (read back bitwise, and by torch's own report) and whether one of them is a
    meta tensor (which holds no values: copying into it does nothing)."""
    with torch.no_grad():
        report = model.load_state_dict(values, strict=False)
    now = model.state_dict()
    missing = set(report.missing_keys)
    refused = [k for k, want in values.items()
               if k in missing or k not in now or not _as_written(now[k], want)]
    return refused, any(isinstance(now.get(k), Tensor) and now[k].is_meta for k in refused)


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> nn.Module:
    r"""Load a state dict saved in any weight-norm layout into ``model``: same outputs after.

    Each weight is matched by name in any layout. Where the checkpoint's ``(g, v)`` have the
    model's shapes they are copied as they are; otherwise :math:`w = g\,v/\lVert v\rVert` is
    computed along the checkpoint's axis (read off g's shape) and the model gets
    :math:`g = \lVert w\rVert`, ``v = w`` along its own axis (``w`` where it is plain): g is the
    norm the layer's forward divides by, so that ``w`` comes back bit for bit; where the dtypes
    differ, values are computed in float64 and cast once to the model's. DDP/DataParallel and
    ``torch.compile`` wrappers and their key prefixes are read past. After loading, the model's
    state is read back and compared bitwise with what was loaded, so a module that reads its
    keys its own way or a pre-hook that renames them cannot leave a weight unloaded silently.
    On any error the model is as it was.

    Args:
        model: the model to load into (wnorm-normalized, PyTorch-normalized or plain layers).
        state_dict: the state dict (not a dict nesting one).
        strict: when True (default), keys the model lacks or the state dict lacks, parameters
            the model's own ``state_dict`` leaves out, and values the model does not take are
            errors; when False, what loads is loaded and the rest is named in a warning.

    Returns:
        The same model.

    Raises:
        WnormError: naming the key: missing, unexpected or not taken (strict), a shape or dtype
            kind that differs from the model's, NaN/inf, a value that overflows the model's
            dtype, zero-norm slices where the model normalizes, a g whose axis cannot be read
            off its shape, one weight held in two layouts, a value that is not a tensor.

    Example:
        >>> import torch, wnorm
        >>> from wnorm.state_dict import load_state_dict
        >>> old = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(4, 3, 5))  # dim 0
        >>> new = wnorm.weight_norm(torch.nn.ConvTranspose1d(4, 3, 5))  # dim 1
        >>> new = load_state_dict(new, old.state_dict())
        >>> x = torch.randn(1, 4, 7)
        >>> torch.allclose(new(x), old(x), atol=1e-6)
        True
    """
    expect_module("load_state_dict", model)
    if not isinstance(strict, bool):  # None or 0 would load non-strictly without being asked
        raise WnormError(f"load_state_dict: strict must be True or False; got {strict!r}")
    inner = _unwrap(model)
    name = type(inner).__name__
    refuse_sharded(f"load_state_dict into {name}", inner,
                   "load before sharding (wnorm.apply, wnorm.load_state_dict, then fully_shard), "
                   "or give torch.distributed.checkpoint.state_dict.set_model_state_dict a full "
                   "state dict in the model's own layout (for a plain sd: "
                   "wnorm.convert_state_dict(sd, 'wnorm', dim={key: axis, ...}) naming each "
                   "weight wnorm.apply normalized and its axis)")
    values, bad, note = _plan(inner, state_dict)
    note = f" ({note})" if note else ""
    unreachable = _unreachable(inner)
    problems = []
    if bad.missing_keys:
        problems.append(f"missing keys {bad.missing_keys}")
    if bad.unexpected_keys:
        problems.append(f"unexpected keys {bad.unexpected_keys}")
    if bad.halves:
        problems.append(f"half of a weight-norm pair: {'; '.join(bad.halves)}")
    problems += _other_maps(inner, bad)
    if unreachable:
        owners = sorted({_owner(inner, k, "_save_to_state_dict") for k in unreachable} - {""})
        problems.append(f"parameters/buffers {unreachable} that the model's own state_dict "
                        f"leaves out, so no state dict can set them ({'; '.join(owners)})")
    if strict and problems:
        raise WnormError(f"load_state_dict into {name}: expected the model's keys (in any "
                         f"weight-norm layout); got {' and '.join(problems)}{note}")
    if problems:
        warnings.warn(f"load_state_dict into {name} (strict=False): not loaded: "
                      f"{', '.join(problems)}{note}", stacklevel=2)
    saved = _snapshot(inner)  # to put back if the model's own loader fails or refuses
    try:
        refused, meta = _load_checked(inner, values)
    except RuntimeError as e:
        _restore(saved)
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        # what the layers' own loaders refused (wnorm's state hooks name the layer)
        why = str(e).split("\n", 1)[-1].strip()
        raise WnormError(f"load_state_dict into {name}: {why}; the model is as it was") from None
    except BaseException:
        _restore(saved)
        raise
    if refused:
        owners = "; ".join(sorted({_owner(inner, k, "_load_from_state_dict") for k in refused}
                                   - {""}))
        message = (f"load_state_dict into {name}: the model did not take {refused} as given "
                   f"(read back after loading, they differ or its loader skipped them)"
                   + (f"; they belong to {owners}" if owners else "")
                   + ("; some are on the meta device, which holds no values: give the model "
                      "real storage first (model.to_empty(device=...))" if meta else "") + note)
        if strict:
            _restore(saved)
            raise WnormError(message + "; the model is as it was")
        warnings.warn(message + " (strict=False: the rest is loaded)", stacklevel=2)
    return model


# --------------------------------------------------------------------------- converting
def convert_state_dict(
    state_dict: Mapping[str, Any], to: Format,
    dim: int | None | Literal["keep"] | Mapping[str, int | None] = "keep",
) -> dict[str, Any]:
    r"""Rewrite a state dict in another weight-norm layout, without the model's code.

    Every pair :math:`(g, v)` of :math:`w = g\,v/\lVert v\rVert` in either PyTorch layout is
    found by its key names; its axis is read off g's kept-dim shape.

    - ``"plain"``: each pair becomes ``w``.
    - ``"torch-old"``, ``"torch-new"``, ``"wnorm"``: each pair renamed, values untouched, on
      its own axis (Wav2Vec2's ``pos_conv_embed`` keeps ``dim=2``, so the model's own loader
      reads the result); ``dim`` moves every pair to another axis (same weight, new
      :math:`g = \lVert w\rVert`, ``v = w``; ``None``: one norm over the whole tensor).
    - A state dict with no pair at all: for ``"torch-old"``/``"torch-new"`` every weight of 2
      or more axes is normalized along dim 0 (PyTorch's ``weight_norm`` default) unless ``dim``
      says otherwise; biases and 1-D norm-layer weights stay plain. For ``"wnorm"`` they stay
      plain (with a warning) unless ``dim`` names an axis: the axis :func:`wnorm.apply` uses
      depends on the layer type (dim 0 for Linear and ConvNd, 1 for ConvTransposeNd, an
      Embedding not at all), which a state dict does not record.
    - ``dim`` as a mapping ``{weight key: axis or None}`` normalizes (plain) or moves (pairs)
      exactly the weights it names, the rest as they are: ``{"up.weight": 1, "out.weight": 0}``
      gives the layout of ``wnorm.apply(model)``, which the model's own ``load_state_dict``
      takes.

    A weight to normalize with an all-zero slice (an Embedding's padding row) is refused: it has
    no direction, and ``w = g v / ||v||`` would be NaN there.

    Norms and weights are computed in float64 and written in the state dict's own dtypes;
    the input is not changed (untouched tensors are shared, not copied).

    Args:
        state_dict: names to tensors.
        to: ``"plain"``, ``"torch-old"``, ``"torch-new"`` or ``"wnorm"``.
        dim: ``"keep"`` (default), an axis >= 0, None, or a mapping of weight keys (as the
            plain layout names them) to an axis >= 0 or None.

    Returns:
        A new dict.

    Raises:
        WnormError: ``to`` or ``dim`` is unknown or out of range for a weight (or names a key
            that is no weight of the state dict), a value is not a tensor or has NaN/inf, a g's
            axis cannot be read off its shape, a slice to normalize is zero, a computed g or w
            overflows its dtype, or one weight is held in two layouts; the message names the
            key.

    Example:
        >>> import torch
        >>> from wnorm.state_dict import convert_state_dict
        >>> conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 4, 3), dim=2)
        >>> old = convert_state_dict(conv.state_dict(), "torch-old")
        >>> sorted(old), tuple(old["weight_g"].shape)
        (['bias', 'weight_g', 'weight_v'], (1, 1, 3))
        >>> tuple(convert_state_dict(conv.state_dict(), "torch-old", dim=0)["weight_g"].shape)
        (4, 1, 1)
    """
    return lay.convert(state_dict, to, dim)[0]
