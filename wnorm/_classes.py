r"""The generated classes: a reparameterized module's class, with a property per weight.

:func:`class_for` makes, once per class, a subclass of the module's own class (``isinstance``,
the class name and ``repr`` are unchanged) whose property ``<name>`` (:func:`ensure_property`)
returns ``map.weight(g, v)``, computed on every access, and whose methods keep PyTorch's
machinery working on the reparameterized module: its forward (and an RNN's flat weights),
``reset_parameters``, ``.to()``, pickling, ``state_dict`` (:mod:`wnorm._state_hooks`), and the
refusals of what cannot work (``torch.jit.script``, ``prune`` on the computed weight).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import cache
from ._held import (DEPTH, HELD, TOKEN, flush, flush_all, flush_holders, forgetter, land_tied,
                    land_writes, mark, unmark_stale)
from ._slot import addresses, check_finite, key_of, pair, same, version_of
from ._state_hooks import load_from_state_dict, save_to_state_dict
from .cache import CACHE
from .errors import WnormError, warn_at_user
from .maps import formula_only

__all__ = ["class_for", "ensure_property", "base_class", "refresh_flat_weights",
           "recording_reads", "rebuild"]

_is_compiling, _is_tracing = torch.compiler.is_compiling, torch._C._is_tracing


#: the slots whose weight was read while :func:`recording_reads` is on (data_init's pass)
_READS: list[set[int]] = []


@contextlib.contextmanager
def recording_reads() -> Iterator[set[int]]:
    """The ids of the slots whose weight is read in the block, wherever it is read: data_init
    tells a layer whose weight its parent reads (MultiheadAttention's out_proj) from one never
    reached, also when the parent's own forward is wnorm's (no read is held inside one)."""
    _READS.append(set())
    try:
        yield _READS[-1]
    finally:
        _READS.pop()


def _property(pname: str) -> property:
    def fget(self: nn.Module) -> Tensor:
        slot = self.__dict__["_wn"].get(pname)
        if slot is None:  # another instance of this class normalizes pname, this one does not
            return nn.Module.__getattr__(self, pname)
        if _READS:
            _READS[-1].add(id(slot))
        if slot.held is not None:
            flush(self, slot)
        params = self._parameters
        g, v = params.get(slot.gname), params.get(slot.vname)
        if v is None or (g is None and slot.map.has_g):
            pair(self, slot)  # raises, naming what took them away
        compiling = _is_compiling()
        if not compiling and HELD and id(v) in HELD:  # another holder's write lands
            flush_holders(v)
        elif compiling and getattr(v, "_wn_held", 0) == TOKEN:  # Dynamo guards on this, not
            land_tied(slot, v)  # on HELD: computed in the graph, the write would be missed
        # compiled, the graph is the cache (and a version counter read in it is data-
        # dependent: a graph break, an error under fullgraph): each access is computed
        # (both branches below stay inline: a function called from here is a frame of its
        # own, which Dynamo traces where it runs this getter eagerly, as in a compiled LSTM)
        if not compiling and CACHE.on:  # compiling first: Dynamo then guards on no counter
            w, key = slot.cached, slot.key
            # a weight cached under no_grad has no graph: a forward recording one computes it
            if w is not None and same(key, g, v) and key[4] == addresses(g, v) and (
                    key[-1] == cache.STEPS[0]) and (w.requires_grad or not torch.is_grad_enabled()
                    or not (v.requires_grad or (g is not None and g.requires_grad))):
                return w
            if _is_tracing() or formula_only(g, v):
                # a traced graph records the weight itself; under torch.func (vmap over
                # stacked models, grad) g and v are the transform's, forward AD needs the
                # weight's tangent, and computed g or v would be held by the cached weight's
                # node: nothing is cached
                return slot.map.weight(g, v)
            grad = torch.is_grad_enabled() and (
                v.requires_grad or (g is not None and g.requires_grad))
            if grad:
                w = cache.CachedWeight.apply(slot.map, slot.where, g, v)
            else:  # inference: refused once per block if not finite (a host sync, as reads
                w = slot.map.weight(g, v)  # in a training step never are)
                check_finite(slot, w)
            if slot.cached is None:
                CACHE.filled.append(slot)
            else:
                cache.say_if_written(slot)
            slot.cached, slot.key, slot.cached_at = w, cache.cache_key(g, v) + (
                cache.STEPS[0],), version_of(w)
            return w
        w = slot.map.weight(g, v)
        # held until the next access, with a copy, so that a write into it lands in g and v
        # (wnorm._held); not inside a forward, nor compiled, traced or under torch.func
        # transforms: g and v are then the transform's wrappers (no storage to take the
        # address of; a write could not land in the module's own)
        if not (_is_compiling() or _is_tracing()) and DEPTH.n == 0 and \
                not torch._C._are_functorch_transforms_active():
            slot.held, slot.held_key = w, key_of(g, v) + (version_of(w), w.detach().clone(),
                                                           addresses(g, v))
            HELD.setdefault(id(v), []).append((weakref.ref(self, forgetter(id(v), v)), pname))
            mark(v)  # for a tie's other holder's getter under torch.compile
        return w

    def fset(self: nn.Module, value: Any) -> None:
        slot = self.__dict__["_wn"].get(pname)
        if slot is not None:
            raise WnormError(
                f"{slot.where}: '{pname}' is weight-normalized and computed from "
                f"'{pname}_g' and '{pname}_v'; assign those, write into it in place, or call "
                f"wnorm.remove_weight_norm(module, {pname!r}) first (torch.func.functional_call: "
                f"pass '{pname}_g' and '{pname}_v', or call it on "
                "wnorm.fold(copy.deepcopy(model)) to pass the weight itself)"
            )
        self.__dict__[pname] = value

    return property(fget, fset, doc=f"``{pname}`` computed from ``{pname}_g``, ``{pname}_v``")


# --------------------------------------------------------------------------- generated classes
_CLASSES: dict[type, type] = {}


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    base = type(self)._wn_base
    if _is_compiling() or _is_tracing() or CACHE.on:
        # no depth to keep: a weight read in a cached() block is never held, nor one read by a
        # compiled or traced forward (asked first: Dynamo would guard on the block's depth,
        # compiling the same graph again for every depth of cached() blocks)
        return base.forward(self, *args, **kwargs)
    DEPTH.n += 1
    try:
        return base.forward(self, *args, **kwargs)
    finally:
        DEPTH.n -= 1


def _rnn_forward(self: nn.RNNBase, *args: Any, **kwargs: Any) -> Any:
    # RNNs run on the list self._flat_weights: fill it with the computed weights (with the graph
    # to g and v when recording), run, then keep detached copies so that the module never holds
    # a non-leaf tensor between calls (deepcopy needs that).
    specs, params = self.__dict__["_wn"], self._parameters
    DEPTH.n += 1
    try:
        self.__dict__["_flat_weights"] = [
            getattr(self, n) if n in specs else params.get(n) for n in self._flat_weights_names
        ]
        return type(self)._wn_base.forward(self, *args, **kwargs)
    finally:
        DEPTH.n -= 1
        self.__dict__["_flat_weights"] = [
            None if t is None else t.detach() for t in self.__dict__["_flat_weights"]
        ]


def _rnn_weights_have_changed(self: nn.RNNBase) -> bool:
    return False  # the generated forward refreshes the flat weights itself, every call


def _rnn_init_flat_weights(self: nn.RNNBase) -> None:
    with torch.no_grad():  # see _rnn_forward: no graph kept on the module
        DEPTH.n += 1
        try:
            type(self)._wn_base._init_flat_weights(self)
        finally:
            DEPTH.n -= 1


def refresh_flat_weights(module: nn.Module) -> None:
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()
        module._flat_weight_refs = [None] * len(module._flat_weights)


def _setattr(self: nn.Module, name: str, value: Any) -> None:
    # nn.Module.__setattr__ registers Parameters itself (the property's setter never runs):
    # refuse them here for a normalized name, with the same message.
    slots = self.__dict__.get("_wn", {})
    if isinstance(value, nn.Parameter) and name in slots:
        type(self).__dict__[name].fset(self, value)
    for s in slots.values():
        # g or v replaced after a write into the held weight: the write lands in the tensors
        # it was made over, and the new one wins, as it came last (eager code landed it over
        # the new one, torch.export in the old ones: they disagreed)
        if s.held is not None and name in (s.gname, s.vname):
            flush(self, s)
            if isinstance(value, Tensor) and "DTensor" in (type(value).__name__,
                                                           type(value.data).__name__):
                # FSDP2's fully_shard copied g and v into shards before assigning them: the
                # write landed in the tensors it replaces
                warn_at_user(
                    f"{s.where}: '{s.name}' was written in place and the write was still "
                    f"pending when '{name}' was sharded (FSDP2's fully_shard): it landed in the "
                    "unsharded tensors, which the shards were copied from before, and is lost; "
                    "make one access (model.state_dict()) after writing, before fully_shard")
        if name in (s.gname, s.vname):
            unmark_stale(value)
    type(self)._wn_base.__setattr__(self, name, value)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # The generated class is not importable by name: rebuild it from the original class.
    land_writes(self)
    return (rebuild, (type(self)._wn_base, self.__getstate__()))


def rebuild(base: type, state: dict[str, Any]) -> nn.Module:
    cls = class_for(base)
    for pname in state.get("_wn", {}):
        ensure_property(cls, pname)
    module = cls.__new__(cls)
    module.__setstate__(state)
    refresh_flat_weights(module)
    return module


# pickled models name it where wnorm 0.2.0 defined it (wnorm._reparam imports it): pickles
# load both ways between versions
rebuild.__module__, rebuild.__name__, rebuild.__qualname__ = \
    "wnorm._reparam", "_rebuild", "_rebuild"

def _extra_repr(self: nn.Module) -> str:
    base = type(self)._wn_base.extra_repr(self)
    wn = ", ".join(f"{p}: dim={s.map.dim}" + ("" if s.map.kind == "wn" else f", {s.map.kind}")
                   for p, s in self.__dict__["_wn"].items())
    return f"{base}, weight_norm=({wn})" if base else f"weight_norm=({wn})"


def _apply(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    land_writes(self)  # a write into a held weight lands before .to()/.half() moves g and v
    for s in self.__dict__["_wn"].values():
        s.key = ()  # .to() swaps param.data, moving no version: a cached weight is stale
    return type(self)._wn_base._apply(self, fn, *args, **kwargs)


def _reset_parameters(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The layer's own init runs on v, seen under the weight's name in a plain layer's layout (the
    # module is its own class for the call, and an RNN's parameters are in their usual order,
    # as its init draws them), then (g, v) = split(v): the weight is the layer's usual init.
    cls = type(self)
    flush_all(self)
    specs, params = self.__dict__["_wn"], self._parameters
    layout = {n: p for n, p in params.items()
              if not any(n in (s.gname, s.vname) for s in specs.values())}
    layout.update((pname, params[s.vname]) for pname, s in specs.items())
    if isinstance(self, nn.RNNBase):
        layout = {n: layout[n] for n in [*self._flat_weights_names, *layout] if n in layout}
    elif isinstance(self, nn.RNNCellBase):  # its init draws its four tensors in this order
        layout = {n: layout[n] for n in ["weight_ih", "weight_hh", *layout] if n in layout}
    self.__dict__["_parameters"] = layout
    self.__class__ = cls._wn_base
    try:
        out = cls._wn_base.reset_parameters(self, *args, **kwargs)
    finally:
        self.__class__ = cls
        self.__dict__["_parameters"] = params
        with torch.no_grad():
            for pname, s in specs.items():
                new_g, new_v = s.map.split(layout[pname].detach().clone())
                v = params[s.vname]
                v.copy_(new_v)  # layout[pname] is v, or a tensor the init assigned instead
                g = params.get(s.gname)
                if g is not None and new_g is not None:
                    g.copy_(new_g)
    return out


def _label(module: nn.Module) -> str:
    """The layer as wnorm's errors name it (its first normalized weight's ``where``)."""
    slots = module.__dict__.get("_wn") or {}
    return next((s.where for s in slots.values()), type(module).__name__)


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    # torch.jit.script calls this on every submodule first: its own error points at
    # _forward's *args, which says nothing of what to do
    raise WnormError(
        f"{_label(self)}: torch.jit.script cannot compile a weight-normalized layer (its weight "
        "is a Python property computed from g and v); script wnorm.fold(copy.deepcopy(model)) "
        "for inference, or use torch.export, torch.compile or torch.jit.trace")


def _register_parameter(self: nn.Module, name: str, param: Any) -> None:
    slots = self.__dict__.get("_wn") or {}
    if name.endswith("_orig") and name[:-5] in slots and not isinstance(param, nn.Parameter) \
            and param is not None:
        # torch.nn.utils.prune on the computed weight: it would register the weight computed
        # from g and v as '<name>_orig' (PyTorch raises a TypeError that names no layer)
        s = slots[name[:-5]]
        raise WnormError(
            f"{_label(self)}: torch.nn.utils.prune cannot prune '{s.name}', which wnorm computes "
            f"from '{s.gname}' and '{s.vname}'; prune '{s.vname}' (entries of a direction) or "
            f"'{s.gname}' (whole units) one-shot, calling prune.remove on it before the next "
            "forward (wnorm keeps no mask through training), or prune the plain model "
            "wnorm.fold gives")
    if any(name in (s.gname, s.vname) for s in slots.values()):
        unmark_stale(param)
    self._wn_base.register_parameter(self, name, param)


def class_for(base: type) -> type:
    if "_wn_base" in base.__dict__:
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        ns: dict[str, Any] = {
            "_wn_base": base,
            "__reduce_ex__": _reduce_ex,
            "__setattr__": _setattr,
            "extra_repr": _extra_repr,
            "_apply": _apply,
            "_save_to_state_dict": save_to_state_dict,
            "_load_from_state_dict": load_from_state_dict,
            "forward": _forward,
            "__prepare_scriptable__": _prepare_scriptable,
            "register_parameter": _register_parameter,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        if hasattr(base, "reset_parameters"):
            ns["reset_parameters"] = _reset_parameters
        if issubclass(base, nn.RNNBase):
            ns["forward"] = _rnn_forward
            ns["_weights_have_changed"] = _rnn_weights_have_changed
            ns["_init_flat_weights"] = _rnn_init_flat_weights
        cls = type(base.__name__, (base,), ns)
        _CLASSES[base] = cls
    return cls


def ensure_property(cls: type, pname: str) -> None:
    if not isinstance(cls.__dict__.get(pname), property):
        setattr(cls, pname, _property(pname))


def base_class(module: nn.Module) -> type:
    """The class ``module`` was built as (its own class when wnorm has not touched it)."""
    return type(module).__dict__.get("_wn_base", type(module))
