r"""A reparameterized module's state-dict methods: g and v saved with what they mean, and loaded
from wnorm's layout or from another one.

A state dict holds ``<name>_g`` and ``<name>_v`` and records each map's kind and settings in its
``_metadata`` (a centered (g, v) loaded into a weight norm of the same shapes would otherwise
load without a word). Loading also reads PyTorch's parametrization keys and a plain weight
(:func:`_read_other_layout`), and replaces any write held into the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _layouts
from ._held import HELD, drop_holders, flush, land_writes, unhold
from ._slot import Slot
from .errors import WnormError
from .maps import METHODS, OTHER_MAP, kind_mismatch, norm, settings

__all__ = ["save_to_state_dict", "load_from_state_dict"]


def save_to_state_dict(self: nn.Module, destination: dict[str, Any], prefix: str,
                        keep_vars: bool) -> None:
    land_writes(self)
    type(self)._wn_base._save_to_state_dict(self, destination, prefix, keep_vars)
    meta = getattr(destination, "_metadata", None)
    if meta is not None:  # what g and v mean: a centered (g, v) loaded into a weight norm of
        # the same shapes would load without a word and give other outputs
        entry = meta.setdefault(prefix[:-1], {})
        entry["wnorm"] = {p: s.kind for p, s in self.__dict__["_wn"].items()}
        entry["wnorm_map"] = {p: settings(s.map) for p, s in self.__dict__["_wn"].items()}
    # a class with its own _save_to_state_dict (torch_geometric's Linear) may have written the
    # computed weight and not g and v: save the parameters instead
    for pname, s in self.__dict__["_wn"].items():
        destination.pop(prefix + pname, None)
        for n in (s.gname, s.vname):
            p = self._parameters.get(n)
            if p is not None and prefix + n not in destination:
                destination[prefix + n] = p if keep_vars else p.detach()


def load_from_state_dict(self: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                          local_metadata: Mapping[str, Any], strict: bool,
                          missing_keys: list[str], unexpected_keys: list[str],
                          error_msgs: list[str]) -> None:
    # PyTorch's parameter names: callers pass them as keywords (Lightning's DeepSpeed restore)
    specs = self.__dict__["_wn"]
    why = kind_mismatch(local_metadata, {p: s.map for p, s in specs.items()}, state_dict,
                        prefix)
    if why:  # as PyTorch does for a shape that differs: named, and raised after the load
        error_msgs.append(f"{next(iter(specs.values())).where}: {why}: {OTHER_MAP} (nothing "
                          "of this layer was loaded)")
        return
    for pname, s in specs.items():
        why = _read_other_layout(self, s, pname, state_dict, prefix,
                                 bool(local_metadata.get("assign_to_params_buffers", False)))
        if why:
            error_msgs.append(f"{s.where}: {why} (nothing of this layer was loaded)")
            return
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    for s in specs.values():
        why = _non_finite(self, s, state_dict, prefix, assign)
        if why:
            error_msgs.append(f"{why} (nothing of this layer was loaded)")
            return
    for s in self.__dict__["_wn"].values():
        loaded = all(prefix + n in state_dict for n in (s.gname, s.vname)
                     if n in self._parameters)
        v = self._parameters.get(s.vname)
        if loaded and HELD and v is not None and id(v) in HELD:
            # the loaded g and v replace a write not yet split made through any holder of a
            # tie (a checkpoint storing the tied weight once, under the embedding's keys)
            drop_holders(v)
        if s.held is None:
            continue
        if loaded:
            unhold(s)  # the loaded g and v replace a write not yet split
        else:
            # not loaded here (strict=False, a state dict of other layers): the write lands,
            # and a key given for g or v alone then replaces its part
            flush(self, s)
    type(self)._wn_base._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)


def _non_finite(module: nn.Module, s: Slot, state_dict: Any, prefix: str,
                assign: bool) -> str:
    """Why the g and v given for ``s`` would make NaN or inf weights, else "": a non-finite g
    or v, or a slice whose norm the layer computes as 0 or inf (a zero row of v, one too small
    or too large for its dtype), as ``wnorm.load_state_dict`` refuses them. g and v's norms
    are checked, not the weight (building it cost 18 times a plain load); under FSDP2 every
    rank answers alike. Not for a meta value, nor one of another shape (PyTorch's loader names
    that): a host sync per layer, at load time."""
    given = {n: state_dict.get(prefix + n) for n in (s.gname, s.vname)}
    if not any(isinstance(t, Tensor) for t in given.values()):
        return ""
    for n in ((s.gname, s.vname) if s.map.has_g else (s.vname,)):
        own, t = module._parameters.get(n), given[n]
        if own is None:
            return ""
        t = own if t is None else t  # strict=False with one of them: the other is the layer's
        if not isinstance(t, Tensor) or t.is_meta or (own.is_meta and not assign) or \
                tuple(t.shape) != tuple(own.shape) or not t.is_floating_point():
            continue
        t = t.detach() if assign or own.is_meta else t.detach().to(own.dtype)
        with torch.no_grad():
            if n != s.vname:  # g: a vector, cheap to check whole
                # reductions made whole (FSDP2's DTensors): every rank answers alike
                if not bool(_layouts.everywhere(torch.isfinite(t).all())):
                    bad_g = int(_layouts.everywhere((~torch.isfinite(t)).sum()))
                    return (f"{s.where}: '{prefix + n}' has {bad_g} "
                            f"NaN or inf values of {t.numel()}; '{s.name}' computed from it "
                            "would be NaN or inf")
                continue
            # v: its norms tell a NaN or inf entry too, in one pass (isfinite(v).all() took
            # 40 times as long on a CPU)
            idx = _layouts.bad_slices(t, s.map.dim, s.map)
            if idx:
                along = "" if s.map.dim is None else f" along dim {s.map.dim}"
                compute = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
                return (f"{s.where}: '{prefix + n}' has {len(idx)} slices{along} (indices "
                        f"{idx[:10]}) whose norms {compute} computes as 0, inf or NaN (a zero "
                        "row, a NaN or inf entry, or entries below about 1e-19 or above about "
                        f"1e19 in float32); '{s.name}' would be NaN or inf there")
    return ""


def _read_other_layout(module: nn.Module, s: Slot, pname: str, state_dict: Any,
                       prefix: str, assign: bool = False) -> str:
    """Put this weight's (g, v) into ``state_dict`` under wnorm's keys where it holds them in
    another layout only: PyTorch's parametrization (``parametrizations.<name>.original0/1``,
    the keys of a model's own checkpoints before wnorm.apply adopted its layers, which
    PyTorch's hook renamed on load) or a plain weight. Without this a ``strict=False`` load
    (transformers' Trainer, a backbone under a new head) left the layer as it was, silently.
    ``state_dict`` is ``nn.Module.load_state_dict``'s own copy, which PyTorch's hooks rewrite
    too. With ``assign=True`` (g, v) keep the checkpoint's dtype, as the layer's other
    tensors do; a meta checkpoint gives meta (g, v), unchecked. Returns why it cannot ("" when
    done or nothing to do)."""
    gk, vk = prefix + s.gname, prefix + s.vname
    if gk in state_dict or vk in state_dict or not isinstance(state_dict, dict):
        return ""
    o0, o1 = (f"{prefix}parametrizations.{pname}.original{i}" for i in (0, 1))
    pair = o0 in state_dict and o1 in state_dict
    if not pair and s.kind == "wn" and (o0 in state_dict or o1 in state_dict):
        # one half alone (a sharded checkpoint split between them, each shard loaded with
        # strict=False): taken as g or v where its shape is theirs, as PyTorch's own layer takes
        # it; a half saved along another axis cannot be moved alone and stays unexpected
        half, mine = (o0, s.gname) if o0 in state_dict else (o1, s.vname)
        p = module._parameters.get(mine)
        t = state_dict[half]
        if p is not None and isinstance(t, Tensor) and tuple(t.shape) == tuple(p.shape):
            state_dict[prefix + mine] = state_dict.pop(half)
        return ""
    if not (pair or prefix + pname in state_dict):
        return ""
    key = o1 if pair else prefix + pname
    # a forced weight norm with a learned g is weight norm's map: read as one, v then put on
    # its sphere below
    if s.kind != "wn" and not (s.kind == "forced" and s.map.has_g):
        return (f"the state dict holds its '{pname}' as '{key}', which a "
                f"wnorm.{METHODS.get(s.kind, s.kind)} weight cannot be loaded from (its (g, v) "
                "come only from a checkpoint of the same method); load it into a model built "
                "with wnorm.weight_norm or without weight norm")
    g, v = module._parameters.get(s.gname), module._parameters[s.vname]
    got = state_dict[key]
    if not isinstance(got, Tensor) or (pair and not isinstance(state_dict[o0], Tensor)):
        return ""  # PyTorch's loader says what is wrong
    dtype = got.dtype if assign else v.dtype
    g_dtype = dtype if assign or g is None else g.dtype
    try:
        if pair:
            src = _layouts.Src((o0, o1), g=state_dict[o0], v=got)
            if g is not None and tuple(src.g.shape) == tuple(g.shape):
                new_g, new_v = src.g, src.v  # the same axis: the pair as it is
            elif got.is_meta:  # no values to check: the same weight's pair, on meta
                n = norm(got, _layouts.source_dim(o0, src.g, got))
                new_v = got * (src.g.reshape(n.shape) / n)
                new_g = norm(new_v, s.map.dim)
            else:
                new_v = _layouts.weight(src, dtype, f" for '{vk}'")
                new_g = _layouts._normalized_g(o1, new_v, s.map.dim, g_dtype)
        else:
            if tuple(got.shape) != tuple(v.shape):
                return ""  # PyTorch's loader names the size mismatch
            if got.is_meta:
                new_v, new_g = got, norm(got, s.map.dim)
            else:
                _layouts.check_finite(key, got)
                new_v = _layouts.cast(key, got, dtype, f" for '{vk}'")
                new_g = _layouts._normalized_g(key, new_v, s.map.dim, g_dtype)
        if s.kind == "forced":  # the same weight, v on its sphere
            if not new_v.is_meta and bool((norm(new_v.float(), s.map.dim) == 0).any()):
                return (f"'{key}' has slices of norm 0 along dim {s.map.dim}: a forced weight "
                        "norm needs a direction for every output unit")
            new_v = s.map.split(new_v)[1]
        # in the dtype the layer holds after the load (a float64 checkpoint into a float32
        # layer is computed in float32)
        _layouts.check_computable(key, new_v.to(dtype), s.map.dim)
    except WnormError as e:
        return str(e)
    for k in ((o0, o1) if pair else (key,)):
        del state_dict[k]
    if g is not None:
        state_dict[gk] = new_g.reshape(g.shape) if new_g.numel() == g.numel() else new_g
    state_dict[vk] = new_v
    return ""


