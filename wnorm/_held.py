r"""Writes into a weight handed out, and ties: what wnorm does so that none is lost.

A weight read from outside the layer's own forward (``nn.init`` on it, ``model.apply(init_fn)``,
``.copy_``, ``.data`` edits) is *held* by its slot until the next access, with a copy of it:
then, or at ``state_dict()``, ``.to()``, pickling, ``reset_parameters()`` or a fork, the rows that
differ from the copy are split back into g and v (:meth:`Map.split`), without a host sync.
A held weight is listed under its v in :data:`HELD`, so that every holder of that v (a tie: an
embedding and an LM head) lands it before computing its own. Inside the layer's forward
nothing is held.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._eager import eager, graph_break
from ._slot import Slot, addresses, pair, same, version_of
from .errors import WnormError, warn_at_user
from .maps import Map, norm

__all__ = ["DEPTH", "HELD", "TOKEN", "mark", "forgetter", "flush", "flush_all", "flush_holders",
           "land_tied", "drop_holders", "unhold", "unmark_stale", "land_writes"]

_is_compiling = torch.compiler.is_compiling


class _Depth(threading.local):
    """How many generated forwards this thread is running: 0 means a weight is read from
    outside. Per thread: a forward in another thread (a server's, nn.DataParallel's replicas)
    must not turn this thread's writes into the weight into no-ops."""

    n = 0


DEPTH = _Depth()


def _any_except(t: Tensor, dim: int | None) -> Tensor:
    """``t.any()`` over every axis but ``dim``, kept-dim (the shape of g)."""
    if dim is None:
        return t.any()
    axes = tuple(d for d in range(t.dim()) if d != dim)
    return t.any(dim=axes, keepdim=True) if axes else t


def flush(module: nn.Module, slot: Slot) -> None:
    """Split rows written into the held weight back into g and v (no host sync), outside any
    graph being traced or compiled."""
    if _is_compiling():
        if not torch.compiler.is_dynamo_compiling():
            # torch.export's non-strict tracing runs this Python on fake parameters: the write
            # lands in the real g and v the weight was read from, which the program exports
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with unset_fake_temporarily(), disable_proxy_modes_tracing():
                return _flush(module, slot, real=True)
        # run eagerly, once: nothing is held after
        why = (f"wnorm: {slot.where}: '{slot.name}' was written outside a forward and is split "
               f"into '{slot.gname}'/'{slot.vname}' eagerly; read the layer's '{slot.name}' or "
               "call model.state_dict() before compiling or exporting with fullgraph/strict")
        graph_break(why)
        return _flush_now(module, slot)  # eager: the weak references it drops get no guards
    state = torch._C._get_tracing_state()
    if state is None:
        return _flush(module, slot)
    torch._C._set_tracing_state(None)  # an eager update of g and v, not part of the trace
    try:
        return _flush(module, slot)
    finally:
        torch._C._set_tracing_state(state)


#: devices where asking whether a held weight was written costs no host sync
_COMPARE_ON = ("cpu",)


def _alike(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _differs(a: Tensor, b: Tensor) -> Tensor:
    """``a != b`` elementwise, with NaN equal to NaN in the same place: a diverged row read and
    left alone is no write."""
    return (a != b) & ~(a.isnan() & b.isnan())


def _equal(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a, b) or not bool(_differs(a, b).any())


def _flush(module: nn.Module, slot: Slot, real: bool = False) -> None:
    """A row counts as written when it differs from the copy taken as the weight was handed
    out; other rows keep g and v as they are now (edited through .data or stepped since).
    ``real``: the module holds fakes (torch.export's tracing); the g and v the weight was read
    from take the write, asked on any device (an export is no training step to keep free of
    host syncs).
    """
    held, key = slot.held, slot.held_key
    unhold(slot)
    if held is None:
        return
    if not real:
        pair(module, slot)  # raises, naming what took g or v away (prune)
    # the write lands in the g and v it was read from: tensors swapped in since without an
    # assignment (torch.func.functional_call's, register_parameter's) are the caller's, and
    # an assignment lands it first (_classes._setattr)
    m, g, v = slot.map, key[0], key[1]
    held, snap = held.detach(), key[5]
    bumped, swapped = version_of(held) != key[4], not _alike(held, snap)
    if not (bumped or swapped) and not _alike(v, snap):
        return  # g and v were replaced by tensors of another shape, dtype or device
    asked = real or held.device.type in _COMPARE_ON
    if asked and not swapped and _equal(held, snap):
        return  # nothing written (on a CPU, asking costs no device sync)
    # A write through .data (w.data[0] = 3, w.data.mul_(2)) moves no version: only the copy
    # tells it, so g or v changed since (an optimizer step after the write) do not make the
    # held weight stale. Whether anything was written is known unless the device was not
    # asked; then (a GPU, after a step) written rows still land below, without a host sync.
    known = bumped or swapped or asked
    # g and v edited through .data move no version: an assignment (vector_to_parameters) moves
    # their data, and on a CPU their values tell an edit in place (another process's step into
    # shared memory)
    stale = not same(key, g, v) or key[6] != addresses(g, v)
    # not while exporting: m.weight then takes the traced formula, which need not match the
    # eager snapshot bit for bit (a false warning); versions and addresses still tell a change
    if not stale and asked and not swapped and not real:
        with torch.no_grad():
            stale = not _equal(m.weight(g, v), snap)
    if stale and known:
        # both written since the weight was handed out, which came last is not recorded: the
        # weight's write lands (a write made after backward, before the step, is meant), and a
        # warning says g and v's own change (a checkpoint loaded in place) is overwritten
        warn_at_user(
            f"{slot.where}: '{slot.name}' was written in place after it was read, and "
            f"'{slot.gname}'/'{slot.vname}' were changed in place (or through .data) since; "
            f"the write into "
            f"'{slot.name}' lands over their change. If theirs should win (a checkpoint "
            f"loaded in place), read '{slot.name}' again (or call state_dict()) before "
            "changing them")
    if not _alike(held, v):
        raise WnormError(
            f"{slot.where}: '{slot.name}' was replaced through .data by a tensor of shape "
            f"{tuple(held.shape)}, {held.dtype} on {held.device}; it is computed from "
            f"'{slot.gname}'/'{slot.vname}' of shape {tuple(v.shape)}, {v.dtype} on {v.device}"
        )
    # the refusals below read the device on the host: not for a read (logging) followed by a
    # step on a GPU, the common case there, where no write is known
    check = known or not stale
    with torch.no_grad():
        if swapped:
            snap = m.weight(g, v)  # compared with what g and v give now
        changed = _any_except(_differs(held, snap), m.dim)
        if not m.has_g and getattr(m, "gain", None) is None:
            if check and bool(changed.any()):  # a host sync, as a write from outside may be
                raise WnormError(
                    f"{slot.where}: '{slot.name}' was written in place, but a "
                    f"{type(m).__name__} weight is determined by '{slot.vname}' alone and "
                    "cannot take an arbitrary value; write into "
                    f"'{slot.vname}' instead, or remove_weight_norm first"
                )
            return
        new_g, new_v = m.split(held)
        # a finite row written whose norm is past the dtype (float16: 65504) would be g = inf
        # and NaN outputs (rows not written, or written non-finite, are not this); a host
        # sync, for a write known only (a read for logging costs none)
        if new_g is not None and known and bool((
                changed & ~_any_except(~torch.isfinite(held), m.dim)
                & ~torch.isfinite(new_g.reshape(changed.shape))).any()):
            raise WnormError(
                f"{slot.where}: '{slot.name}' was written with rows whose norms overflow "
                f"{held.dtype} (largest |entry| {float(held.abs().max()):.3g}); '{slot.gname}' "
                "cannot hold them, and the write is dropped (the layer keeps its weight): write "
                "smaller values or use a wider dtype")
        wide = held.float() if held.dtype in (torch.float16, torch.bfloat16) else held
        zero = norm(m.direction(wide), m.dim) == 0  # no direction: keep v, g goes to 0
        if type(m).direction is not Map.direction and known and bool(
                (changed & zero & _any_except(held != 0, m.dim)).any()):  # as above
            # a centered map takes a written row's centered part (its mean is dropped): a
            # constant row has none, and g = 0 would leave the unit dead, with no gradient
            raise WnormError(
                f"{slot.where}: '{slot.name}' was written with constant nonzero rows, but a "
                f"{type(m).__name__} centers every row and takes only what varies in a written "
                "one (its mean is dropped): a constant row would become 0, with no gradient; "
                "write rows that vary (or zeros), or remove_weight_norm first")
        if not m.has_g and check and bool((changed & zero).any()):  # as above
            raise WnormError(
                f"{slot.where}: '{slot.name}' was written with rows of norm 0, but a "
                f"{type(m).__name__} with a fixed gain has norm {getattr(m, 'gain', None)} in "
                "every row and takes only a written row's direction; write rows that have one")
        # Not known (a GPU, no host sync, no version moved: a read for logging): the rows may
        # all be unchanged, and are then rewritten with their own values, through .data so that
        # a graph that saved v or g (a forward still awaiting its backward) stays valid; the
        # cache, keyed on versions, is told by hand. A write known is made in place, so that
        # such a backward is refused as autograd refuses one after any in-place change, not
        # run on the written g and v
        tv, tg = (v, g) if known else (v.data, None if g is None else g.data)
        tv.copy_(torch.where(changed & ~zero, new_v, v))
        if tg is not None and new_g is not None:
            tg.copy_(torch.where(changed, new_g, g))
        if not asked:
            slot.key = ()


_flush_now = eager(_flush)


def flush_all(module: nn.Module) -> None:
    for s in module.__dict__.get("_wn", {}).values():
        if s.held is not None:
            flush(module, s)


#: id(v) -> (module, name) of every holder of v that holds a weight handed out: an access
#: through any holder of that v (a tie: an embedding and an LM head) lands their writes first
HELD: dict[int, list[tuple[Any, str]]] = {}  # weak: a dropped model leaves nothing behind


#: the value of ``v._wn_held`` while :data:`HELD` has v: what a tie's other holder's getter
#: asks under torch.compile (Dynamo guards on an attribute, not on a dict of weak references).
#: Per process: a Parameter pickled on its own carries its __dict__, and a flag from another
#: process (or from before a reload here, see unmark_stale) must not read as a held write
TOKEN = int.from_bytes(os.urandom(6), "little") | 1


def mark(v: Tensor) -> None:
    v._wn_held = TOKEN


def _unmark(v: Tensor) -> None:
    v.__dict__.pop("_wn_held", None)


def unmark_stale(v: Any) -> None:
    """Drop a flag no entry of :data:`HELD` backs (a Parameter reloaded from a pickle taken
    while held, given to a layer)."""
    if isinstance(v, Tensor) and "_wn_held" in v.__dict__ and id(v) not in HELD:
        _unmark(v)


def forgetter(key: int, v: Tensor) -> Callable[[Any], None]:
    """The weakref callback that drops a dropped module's entry from :data:`HELD` (and v's
    flag with the last one)."""
    vref = weakref.ref(v)

    def forget(ref: Any) -> None:
        refs = HELD.get(key)
        if refs is not None:
            refs[:] = [e for e in refs if e[0] is not ref]
            if not refs:
                del HELD[key]
                alive = vref()
                if alive is not None:
                    _unmark(alive)
    return forget


def unhold(s: Slot) -> None:
    """Clear ``s``'s held weight; once no holder of its v holds one, v leaves :data:`HELD`
    and loses its flag (a flag left behind broke every later compiled graph of the layer)."""
    key = s.held_key
    s.held, s.held_key = None, ()
    if not key:
        return
    v = key[1]
    for ref, pname in HELD.get(id(v), ()):
        module = ref()
        other = None if module is None else module.__dict__.get("_wn", {}).get(pname)
        if other is not None and other.held is not None and other.held_key[1] is v:
            return
    HELD.pop(id(v), None)
    _unmark(v)


def _holders(v: Tensor) -> Iterator[tuple[nn.Module, Slot]]:
    """The modules, and their slots, holding a weight read from ``v`` (every holder of a tie:
    an LM head sharing its embedding's g and v), taken off :data:`HELD`."""
    _unmark(v)
    for ref, pname in HELD.pop(id(v), ()):
        module = ref()
        s = None if module is None else module.__dict__.get("_wn", {}).get(pname)
        if s is not None and s.held is not None and s.held_key[1] is v:
            yield module, s


def flush_holders(v: Tensor) -> None:
    for module, s in list(_holders(v)):
        flush(module, s)


@eager  # HELD, whose entries go when a dropped module's weak reference dies, gets no guards
def _flush_holders_now(v: Tensor) -> None:
    flush_holders(v)


def land_tied(slot: Slot, v: Tensor) -> None:
    """Under torch.compile, land the writes held by a tie's other holders (an LM head written
    before its embedding's compiled lookup) eagerly, at a graph break named as :func:`flush`'s."""
    graph_break(f"wnorm: {slot.where}: '{slot.name}' shares '{slot.vname}' with a layer whose "
           "weight was written outside a forward, and the write is split into it eagerly; "
           "call model.state_dict() before compiling or exporting with fullgraph/strict")
    _flush_holders_now(v)


def drop_holders(v: Tensor) -> None:
    """Forget every holder's write read from ``v``: a load replaced it (g and v loaded once
    for a tie, through one holder's keys)."""
    for _, s in list(_holders(v)):
        unhold(s)


def land_writes(module: nn.Module) -> None:
    """Land every write held for ``module``'s g and v: its own, and those made through another
    holder of a tie, before ``module`` is copied, moved, saved or unwrapped (PyTorch reaches the
    embedding before the head that shares its g and v, and the head's write was lost there)."""
    for s in module.__dict__.get("_wn", {}).values():
        v = module._parameters.get(s.vname)
        if HELD and v is not None and id(v) in HELD:
            flush_holders(v)
    flush_all(module)


def _land_before_fork() -> None:
    """Land every held write before the process forks. Otherwise the child (a Hogwild worker
    training shared g and v) and the parent would each land it at their next access: the
    parent's, after the workers trained, over what they trained. A write that cannot land
    stays held, to raise at the next access as it would have."""
    for key in list(HELD):
        for ref, pname in HELD.pop(key, ()):
            module = ref()
            s = None if module is None else module.__dict__.get("_wn", {}).get(pname)
            if s is None or s.held is None:
                continue
            held, v = (s.held, s.held_key), s.held_key[1]
            try:  # landed, v loses its flag with its last held read (unhold)
                flush(module, s)
            except Exception:  # noqa: BLE001 (an at-fork hook only prints what it raises)
                s.held, s.held_key = held
                HELD.setdefault(key, []).append((ref, pname))
                mark(v)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_land_before_fork)
