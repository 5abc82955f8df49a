r"""The mechanism that attaches a map (:mod:`wnorm.maps`) to a module's parameter.

:func:`attach` removes ``<name>`` from the module's parameters, registers ``<name>_g`` and
``<name>_v``, and moves the module to a generated subclass of its own class (``isinstance``,
the class name and ``repr`` are unchanged) whose property ``<name>`` returns
``map.weight(g, v)``, computed on every access: edits of g and v by any means are seen by the
next forward. :func:`wnorm.cached` is the explicit way to compute each weight once.

Writes to the computed weight. The weight handed to code outside the layer's own forward is
kept until the next access, so that writes into it (``nn.init``, ``model.apply(init_fn)``,
``.copy_``, ``.data`` edits) are not lost: then, or at ``state_dict()``, ``.to()``, pickling or
``reset_parameters()``, the rows that differ from what g and v give are split back into g and v
(:meth:`Map.split`), without a host sync. Inside the layer's forward nothing is kept.

The module pickles, deep-copies and loads with ``torch.load(..., weights_only=False)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _layouts, _pytorch_wn
from .errors import WnormError
from ._eager import eager, graph_break
from .maps import METHODS, OTHER_MAP, Map, formula_only, kind_mismatch, norm, settings

__all__ = ["Slot", "CACHE", "watch_steps", "end_block", "attach", "detach", "plain_weight",
           "slots", "slot", "slots_of", "pair", "flush", "flush_all", "land_writes",
           "refresh_flat_weights", "base_class"]

_is_compiling, _is_tracing = torch.compiler.is_compiling, torch._C._is_tracing


class _Depth(threading.local):
    """How many generated forwards this thread is running: 0 means a weight is read from
    outside. Per thread: a forward in another thread (a server's, nn.DataParallel's replicas)
    must not turn this thread's writes into the weight into no-ops."""

    n = 0


_DEPTH = _Depth()


class _Cache(threading.local):
    """State of :func:`wnorm.cached` in this thread: nesting depth and the slots it filled. A
    block covers the thread that opened it: other threads keep computing every weight."""

    def __init__(self) -> None:
        self.on = 0
        self.filled: list[Slot] = []


CACHE = _Cache()


def end_block() -> None:
    """Release the weights of the outermost :func:`wnorm.cached` block, saying which were
    written in place in it (their version moved): the block's forwards used the write, but g
    and v do not hold it, and it goes with the cached weight."""
    for s in CACHE.filled:
        _say_if_written(s)
        s.cached, s.key = None, ()
    CACHE.filled.clear()


def _say_if_written(s: Slot) -> None:
    """Warn when the weight ``s`` cached was written in place: it is let go (at the block's
    end, or computed again after a step or for a forward recording a graph) with the write."""
    w = s.cached
    if w is not None and s.cached_at >= 0 and _version_of(w) != s.cached_at:
        _warn_at_user(
            f"{s.where}: '{s.name}' was written in place inside a wnorm.cached() block: the "
            f"block's forwards used the written weight (if any ran since), but "
            f"'{s.gname}'/'{s.vname}' do not hold it, and it is gone now; write it outside "
            "the block (it is then split into them at the next access)")


#: optimizer steps taken, in any thread: a cached weight is valid for the count it was cached
#: at (a step in autograd's thread, an optimizer-in-backward hook's, refreshes a block opened
#: in the main thread; a thread-local flag would not see it)
_STEPS = [0]


def _after_step(*_: Any) -> None:
    """After any optimizer's step, the weights of :func:`wnorm.cached` blocks are computed
    again: fused steps (``Adam(fused=True)``, ``SGD(fused=True)``) update g and v without moving
    their version counters, on which the cache is keyed, and a block training with one kept
    the weight of before its first step."""
    _STEPS[0] += 1


_WATCHING: list[Any] = []


def watch_steps() -> None:
    """Register :func:`_after_step` with every optimizer, once (at the first block: importing
    torch.optim at ``import wnorm`` would cost every user)."""
    if not _WATCHING:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _WATCHING.append(register_optimizer_step_post_hook(_after_step))


class Slot:
    """One reparameterized parameter: its map, a name for messages, the weight last handed to
    code outside the layer's forward (``held``, with ``held_key``: the g and v it was computed
    from, the versions of g, v and itself then, and a copy of it) and the weight cached by
    :func:`wnorm.cached` (``cached``, valid for ``key``)."""

    __slots__ = ("name", "map", "where", "gname", "vname", "held", "held_key", "cached", "key",
                 "cached_at")

    def __init__(self, name: str, map: Map, where: str) -> None:
        self.name, self.map, self.where = name, map, where
        self.gname, self.vname = name + "_g", name + "_v"
        self.held: Tensor | None = None
        self.held_key: tuple[Any, ...] = ()
        self.cached: Tensor | None = None
        self.key: tuple[Any, ...] = ()
        self.cached_at = -1  # the cached weight's version when cached: a write moves it

    @property
    def dim(self) -> int | None:
        return self.map.dim

    @property
    def kind(self) -> str:
        return self.map.kind

    @property
    def has_g(self) -> bool:
        return self.map.has_g

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.name, self.map, self.where)  # held and cached weights are derived

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> Slot:
        import copy

        return Slot(self.name, copy.deepcopy(self.map, memo), self.where)


def _any_except(t: Tensor, dim: int | None) -> Tensor:
    """``t.any()`` over every axis but ``dim``, kept-dim (the shape of g)."""
    if dim is None:
        return t.any()
    axes = tuple(d for d in range(t.dim()) if d != dim)
    return t.any(dim=axes, keepdim=True) if axes else t


def _version_of(t: Tensor) -> int:
    """``t``'s version, or -1 for an inference tensor (a weight read, or a layer built, under
    ``torch.inference_mode``), which has no version counter: a write into a held weight is
    then told by the copy taken at the read; a write into g or v built there, inside a
    :func:`wnorm.cached` block, is not seen, as one through ``.data`` is not."""
    return -1 if t.is_inference() else t._version


def _key(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    return (g, v, None if g is None else _version_of(g), _version_of(v))


def _same(key: tuple[Any, ...], g: Tensor | None, v: Tensor) -> bool:
    """Whether ``key`` was taken from these very g and v, at their current versions (tensors
    compared by identity: ``==`` on a tensor compares its values)."""
    return (bool(key) and key[0] is g and key[1] is v
            and key[2] == (None if g is None else _version_of(g)) and key[3] == _version_of(v))


def pair(module: nn.Module, slot: Slot) -> tuple[Tensor | None, Tensor]:
    """``(g, v)`` of ``slot`` (g None for a map without one), or an error naming what took
    them away: ``torch.nn.utils.prune`` and ``register_parametrization`` on ``<name>_v`` move
    it out of the module's parameters."""
    params = module._parameters
    g, v = params.get(slot.gname), params.get(slot.vname)
    if v is None or (g is None and slot.map.has_g):
        gone = slot.vname if v is None else slot.gname
        raise WnormError(
            f"{slot.where}: '{gone}' is no longer a parameter of this layer (torch.nn.utils."
            f"prune or a parametrization registered on it moves it away), but '{slot.name}' is "
            f"computed from '{slot.gname}' and '{slot.vname}'; remove that first (prune."
            f"remove / parametrize.remove_parametrizations), or prune the plain weight of "
            f"wnorm.fold(model)")
    return g, v


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


#: the frames a warning skips to name the user's line: reached from a forward or state_dict(),
#: the flush runs under torch's frames as well as wnorm's, and at a fork under
#: multiprocessing's (Python 3.12's skip_file_prefixes does this, but wnorm supports 3.10)
_INTERNAL = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__)) + (
    os.path.join(os.path.dirname(os.__file__), "multiprocessing") + os.sep,
    os.path.join(os.path.dirname(os.__file__), "contextlib.py"))  # a block's end


def _warn_at_user(message: str) -> None:
    """A UserWarning naming the first frame outside wnorm and torch (a computed stacklevel
    would count frames torch.compile's frame evaluation adds, and name torch's)."""
    if _is_compiling():  # Dynamo cannot trace frame access: it names a line of its own
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    f = sys._getframe(1)
    while f.f_back is not None and f.f_code.co_filename.startswith(_INTERNAL):
        f = f.f_back
    warnings.warn_explicit(message, UserWarning, f.f_code.co_filename, f.f_lineno,
                           module=f.f_globals.get("__name__"),
                           registry=f.f_globals.setdefault("__warningregistry__", {}))


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
    _unhold(slot)
    if held is None:
        return
    if not real:
        pair(module, slot)  # raises, naming what took g or v away (prune)
    # the write lands in the g and v it was read from: tensors swapped in since without an
    # assignment (torch.func.functional_call's, register_parameter's) are the caller's, and
    # an assignment lands it first (_setattr)
    m, g, v = slot.map, key[0], key[1]
    held, snap = held.detach(), key[5]
    bumped, swapped = _version_of(held) != key[4], not _alike(held, snap)
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
    stale = not _same(key, g, v) or key[6] != _addresses(g, v)
    # not while exporting: m.weight then takes the traced formula, which need not match the
    # eager snapshot bit for bit (a false warning); versions and addresses still tell a change
    if not stale and asked and not swapped and not real:
        with torch.no_grad():
            stale = not _equal(m.weight(g, v), snap)
    if stale and known:
        # both written since the weight was handed out, which came last is not recorded: the
        # weight's write lands (a write made after backward, before the step, is meant), and a
        # warning says g and v's own change (a checkpoint loaded in place) is overwritten
        _warn_at_user(
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


def _check_finite(slot: Slot, w: Tensor) -> None:
    """Refuse to cache a weight with NaN or inf (a zero row of v, a non-finite g): a host sync,
    once per weight and :func:`wnorm.cached` block."""
    if w.is_meta:  # no values to check (a model built on the meta device)
        return
    if not bool(torch.isfinite(w).all()):
        rows = (~torch.isfinite(w)).flatten(1).any(1) if slot.map.dim == 0 and w.dim() > 1 \
            else None
        which = "" if rows is None else f" in rows {rows.nonzero().flatten().tolist()[:10]}"
        raise WnormError(
            f"{slot.where}: the weight-normalized '{slot.name}' has non-finite values{which}: a "
            f"zero row of '{slot.vname}' (no direction; structured pruning of "
            f"'{slot.vname}' makes those: prune the unit's '{slot.gname}' instead) or a "
            f"non-finite '{slot.gname}' or '{slot.vname}'")


class _Cached(torch.autograd.Function):
    r"""The cached weight :math:`w = \mathrm{map}(g, v)`, one node for every forward of a
    :func:`wnorm.cached` block that reads it. Its backward recomputes the map's
    vector-Jacobian product from g and v, which the node holds itself, not as saved tensors:
    those a backward frees, so a second forward's backward (two forwards, then two backward
    passes) would find them gone, and activation checkpointing counts them, so a recomputed
    forward that reads the cache would not match the first."""

    @staticmethod
    def forward(ctx: Any, map: Map, where: str, g: Tensor | None, v: Tensor) -> Tensor:
        ctx.map, ctx.where, ctx.g, ctx.v = map, where, g, v
        ctx.versions = (None if g is None else g._version, v._version)
        return map.weight(g, v)

    @staticmethod
    def backward(ctx: Any, grad_w: Tensor) -> tuple[Any, ...]:
        g, v = ctx.g, ctx.v
        if ctx.versions != (None if g is None else g._version, v._version):
            raise RuntimeError(  # what autograd says of a saved tensor changed in place
                f"{ctx.where}: one of the variables needed for gradient computation has been "
                "modified by an inplace operation: its g or v changed (an optimizer step?) "
                "between the forward that read the cached weight and this backward")
        create = torch.is_grad_enabled()  # double backward: keep the graph to g and v
        with torch.enable_grad():
            ins = [t if create else t.detach().requires_grad_(t.requires_grad)
                   for t in ((v,) if g is None else (g, v))]
            want = [t for t in ins if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.map.weight(*(([None] if g is None else [])
                                                                + ins)), want, grad_w,
                                             create_graph=create) if want else ())
        got = [next(grads) if t.requires_grad else None for t in ins]
        return (None, None, *([None] if g is None else []), *got)


def _addresses(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    """Where g's and v's data are, and how v's is read: ``v.data = v.data.t()`` keeps a square
    weight's address, and a meta tensor is always at 0, its strides following its shape (g is
    a vector: its address says it all). Checked at every cached access: kept to three reads."""
    return (None if g is None else g.data_ptr(), v.data_ptr(), v.stride())


def _cache_key(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    """What a cached weight is valid for: g and v, their versions and the addresses and layouts
    of their data (a ``param.data = ...`` assignment, as ``vector_to_parameters`` and ``.to()``
    make to every parameter, moves no version). Aliases of g and v pin that data while the key
    lives: freed, its address could be handed to the next assignment's data."""
    return _key(g, v) + (_addresses(g, v), None if g is None else g.detach(), v.detach())


#: id(v) -> (module, name) of every holder of v that holds a weight handed out: an access
#: through any holder of that v (a tie: an embedding and an LM head) lands their writes first
_HELD: dict[int, list[tuple[Any, str]]] = {}  # weak: a dropped model leaves nothing behind


#: the value of ``v._wn_held`` while :data:`_HELD` has v: what a tie's other holder's getter
#: asks under torch.compile (Dynamo guards on an attribute, not on a dict of weak references).
#: Per process: a Parameter pickled on its own carries its __dict__, and a flag from another
#: process (or from before a reload here, see _unmark_stale) must not read as a held write
_TOKEN = int.from_bytes(os.urandom(6), "little") | 1


def _mark(v: Tensor) -> None:
    v._wn_held = _TOKEN


def _unmark(v: Tensor) -> None:
    v.__dict__.pop("_wn_held", None)


def _unmark_stale(v: Any) -> None:
    """Drop a flag no entry of :data:`_HELD` backs (a Parameter reloaded from a pickle taken
    while held, given to a layer)."""
    if isinstance(v, Tensor) and "_wn_held" in v.__dict__ and id(v) not in _HELD:
        _unmark(v)


def _forgetter(key: int, v: Tensor) -> Callable[[Any], None]:
    """The weakref callback that drops a dropped module's entry from :data:`_HELD` (and v's
    flag with the last one)."""
    vref = weakref.ref(v)

    def forget(ref: Any) -> None:
        refs = _HELD.get(key)
        if refs is not None:
            refs[:] = [e for e in refs if e[0] is not ref]
            if not refs:
                del _HELD[key]
                alive = vref()
                if alive is not None:
                    _unmark(alive)
    return forget


def _unhold(s: Slot) -> None:
    """Clear ``s``'s held weight; once no holder of its v holds one, v leaves :data:`_HELD`
    and loses its flag (a flag left behind broke every later compiled graph of the layer)."""
    key = s.held_key
    s.held, s.held_key = None, ()
    if not key:
        return
    v = key[1]
    for ref, pname in _HELD.get(id(v), ()):
        module = ref()
        other = None if module is None else module.__dict__.get("_wn", {}).get(pname)
        if other is not None and other.held is not None and other.held_key[1] is v:
            return
    _HELD.pop(id(v), None)
    _unmark(v)


def _holders(v: Tensor) -> Iterator[tuple[nn.Module, Slot]]:
    """The modules, and their slots, holding a weight read from ``v`` (every holder of a tie:
    an LM head sharing its embedding's g and v), taken off :data:`_HELD`."""
    _unmark(v)
    for ref, pname in _HELD.pop(id(v), ()):
        module = ref()
        s = None if module is None else module.__dict__.get("_wn", {}).get(pname)
        if s is not None and s.held is not None and s.held_key[1] is v:
            yield module, s


def _flush_holders(v: Tensor) -> None:
    for module, s in list(_holders(v)):
        flush(module, s)


@eager  # _HELD, whose entries go when a dropped module's weak reference dies, gets no guards
def _flush_holders_now(v: Tensor) -> None:
    _flush_holders(v)


def _land_tied(slot: Slot, v: Tensor) -> None:
    """Under torch.compile, land the writes held by a tie's other holders (an LM head written
    before its embedding's compiled lookup) eagerly, at a graph break named as :func:`flush`'s."""
    graph_break(f"wnorm: {slot.where}: '{slot.name}' shares '{slot.vname}' with a layer whose "
           "weight was written outside a forward, and the write is split into it eagerly; "
           "call model.state_dict() before compiling or exporting with fullgraph/strict")
    _flush_holders_now(v)


def _drop_holders(v: Tensor) -> None:
    """Forget every holder's write read from ``v``: a load replaced it (g and v loaded once
    for a tie, through one holder's keys)."""
    for _, s in list(_holders(v)):
        _unhold(s)


def land_writes(module: nn.Module) -> None:
    """Land every write held for ``module``'s g and v: its own, and those made through another
    holder of a tie, before ``module`` is copied, moved, saved or unwrapped (PyTorch reaches the
    embedding before the head that shares its g and v, and the head's write was lost there)."""
    for s in module.__dict__.get("_wn", {}).values():
        v = module._parameters.get(s.vname)
        if _HELD and v is not None and id(v) in _HELD:
            _flush_holders(v)
    flush_all(module)


def _land_before_fork() -> None:
    """Land every held write before the process forks. Otherwise the child (a Hogwild worker
    training shared g and v) and the parent would each land it at their next access: the
    parent's, after the workers trained, over what they trained. A write that cannot land
    stays held, to raise at the next access as it would have."""
    for key in list(_HELD):
        for ref, pname in _HELD.pop(key, ()):
            module = ref()
            s = None if module is None else module.__dict__.get("_wn", {}).get(pname)
            if s is None or s.held is None:
                continue
            held, v = (s.held, s.held_key), s.held_key[1]
            try:  # landed, v loses its flag with its last held read (_unhold)
                flush(module, s)
            except Exception:  # noqa: BLE001 (an at-fork hook only prints what it raises)
                s.held, s.held_key = held
                _HELD.setdefault(key, []).append((ref, pname))
                _mark(v)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_land_before_fork)


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
        if not compiling and _HELD and id(v) in _HELD:  # another holder's write lands
            _flush_holders(v)
        elif compiling and getattr(v, "_wn_held", 0) == _TOKEN:  # Dynamo guards on this, not
            _land_tied(slot, v)  # on _HELD: computed in the graph, the write would be missed
        # compiled, the graph is the cache (and a version counter read in it is data-
        # dependent: a graph break, an error under fullgraph): each access is computed
        if not compiling and CACHE.on:  # compiling first: Dynamo then guards on no counter
            w, key = slot.cached, slot.key
            # a weight cached under no_grad has no graph: a forward recording one computes it
            if w is not None and _same(key, g, v) and key[4] == _addresses(g, v) and (
                    key[-1] == _STEPS[0]) and (w.requires_grad or not torch.is_grad_enabled()
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
                w = _Cached.apply(slot.map, slot.where, g, v)
            else:  # inference: refused once per block if not finite (a host sync, as reads
                w = slot.map.weight(g, v)  # in a training step never are)
                _check_finite(slot, w)
            if slot.cached is None:
                CACHE.filled.append(slot)
            else:
                _say_if_written(slot)
            slot.cached, slot.key, slot.cached_at = w, _cache_key(g, v) + (_STEPS[0],), \
                _version_of(w)
            return w
        w = slot.map.weight(g, v)
        # not under torch.func transforms either: g and v are the transform's wrappers (no
        # storage to take the address of; a write could not land in the module's own)
        if not (_is_compiling() or _is_tracing()) and _DEPTH.n == 0 and \
                not torch._C._are_functorch_transforms_active():
            slot.held, slot.held_key = w, _key(g, v) + (_version_of(w), w.detach().clone(),
                                                          _addresses(g, v))
            _HELD.setdefault(id(v), []).append((weakref.ref(self, _forgetter(id(v), v)), pname))
            _mark(v)  # for a tie's other holder's getter under torch.compile
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
    _DEPTH.n += 1
    try:
        return base.forward(self, *args, **kwargs)
    finally:
        _DEPTH.n -= 1


def _rnn_forward(self: nn.RNNBase, *args: Any, **kwargs: Any) -> Any:
    # RNNs run on the list self._flat_weights: fill it with the computed weights (with the graph
    # to g and v when recording), run, then keep detached copies so that the module never holds
    # a non-leaf tensor between calls (deepcopy needs that).
    specs, params = self.__dict__["_wn"], self._parameters
    _DEPTH.n += 1
    try:
        self.__dict__["_flat_weights"] = [
            getattr(self, n) if n in specs else params.get(n) for n in self._flat_weights_names
        ]
        return type(self)._wn_base.forward(self, *args, **kwargs)
    finally:
        _DEPTH.n -= 1
        self.__dict__["_flat_weights"] = [
            None if t is None else t.detach() for t in self.__dict__["_flat_weights"]
        ]


def _rnn_weights_have_changed(self: nn.RNNBase) -> bool:
    return False  # the generated forward refreshes the flat weights itself, every call


def _rnn_init_flat_weights(self: nn.RNNBase) -> None:
    with torch.no_grad():  # see _rnn_forward: no graph kept on the module
        _DEPTH.n += 1
        try:
            type(self)._wn_base._init_flat_weights(self)
        finally:
            _DEPTH.n -= 1


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
                _warn_at_user(
                    f"{s.where}: '{s.name}' was written in place and the write was still "
                    f"pending when '{name}' was sharded (FSDP2's fully_shard): it landed in the "
                    "unsharded tensors, which the shards were copied from before, and is lost; "
                    "make one access (model.state_dict()) after writing, before fully_shard")
        if name in (s.gname, s.vname):
            _unmark_stale(value)
    type(self)._wn_base.__setattr__(self, name, value)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # The generated class is not importable by name: rebuild it from the original class.
    land_writes(self)
    return (_rebuild, (type(self)._wn_base, self.__getstate__()))


def _rebuild(base: type, state: dict[str, Any]) -> nn.Module:
    cls = _class_for(base)
    for pname in state.get("_wn", {}):
        _ensure_property(cls, pname)
    module = cls.__new__(cls)
    module.__setstate__(state)
    refresh_flat_weights(module)
    return module


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


def _save_to_state_dict(self: nn.Module, destination: dict[str, Any], prefix: str,
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


def _load_from_state_dict(self: nn.Module, state_dict: Mapping[str, Any], prefix: str,
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
    for s in self.__dict__["_wn"].values():
        loaded = all(prefix + n in state_dict for n in (s.gname, s.vname)
                     if n in self._parameters)
        v = self._parameters.get(s.vname)
        if loaded and _HELD and v is not None and id(v) in _HELD:
            # the loaded g and v replace a write not yet split made through any holder of a
            # tie (a checkpoint storing the tied weight once, under the embedding's keys)
            _drop_holders(v)
        if s.held is None:
            continue
        if loaded:
            _unhold(s)  # the loaded g and v replace a write not yet split
        else:
            # not loaded here (strict=False, a state dict of other layers): the write lands,
            # and a key given for g or v alone then replaces its part
            flush(self, s)
    type(self)._wn_base._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)


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
    except WnormError as e:
        return str(e)
    for k in ((o0, o1) if pair else (key,)):
        del state_dict[k]
    if g is not None:
        state_dict[gk] = new_g.reshape(g.shape) if new_g.numel() == g.numel() else new_g
    state_dict[vk] = new_v
    return ""


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
        _unmark_stale(param)
    self._wn_base.register_parameter(self, name, param)


def _class_for(base: type) -> type:
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
            "_save_to_state_dict": _save_to_state_dict,
            "_load_from_state_dict": _load_from_state_dict,
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


def _ensure_property(cls: type, pname: str) -> None:
    if not isinstance(cls.__dict__.get(pname), property):
        setattr(cls, pname, _property(pname))


def base_class(module: nn.Module) -> type:
    """The class ``module`` was built as (its own class when wnorm has not touched it)."""
    return type(module).__dict__.get("_wn_base", type(module))


def _check_own_class(module: nn.Module) -> None:
    """Refuse a module whose class another mechanism (PyTorch's parametrize) has subclassed on
    top of wnorm's: giving it its class back would drop that mechanism's class with it."""
    if "_wn" in module.__dict__ and "_wn_base" not in type(module).__dict__:
        raise WnormError(
            f"{type(module).__name__}: PyTorch parametrizations "
            f"({list(getattr(module, 'parametrizations', {}))}) were registered on top of wnorm's "
            "weight norm; remove them first (torch.nn.utils.parametrize.remove_parametrizations)")


# --------------------------------------------------------------------------- attach / detach
#: id -> (weak reference, where) of the Parameters that weight normalization replaced: an
#: optimizer built before holds them, and trains nothing of those layers but their biases
_REPLACED: dict[int, tuple[Any, str]] = {}
_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers already looked at
_CHECKING: list[Any] = []


def _replaced(p: nn.Parameter, where: str, name: str) -> None:
    key = id(p)
    _REPLACED[key] = (weakref.ref(p, lambda _: _REPLACED.pop(key, None)), f"{where} {name!r}")
    if not _CHECKING:  # once; importing torch.optim at import wnorm would cost every user
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _CHECKING.append(register_optimizer_step_pre_hook(_check_optimizer))


def _check_optimizer(optimizer: Any, *_: Any) -> None:
    """At an optimizer's first step: warn when it holds Parameters that weight normalization
    replaced (built before wnorm.apply): they get no gradient, and it trains only biases."""
    if _is_compiling() or not _REPLACED or optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    stale = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _REPLACED.get(id(p))
            if entry is not None and entry[0]() is p:
                stale.append(entry[1])
    if stale:
        _warn_at_user(
            f"{type(optimizer).__name__} holds {len(stale)} Parameters that weight "
            f"normalization replaced ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}):"
            " it was built before wnorm.apply (or weight_norm), and trains nothing of those "
            "layers but their biases; build the optimizer after wnorm.apply")


def attach(module: nn.Module, name: str, map: Map, g: Tensor | None, v: Tensor,
           where: str) -> None:
    """Make ``module.<name>`` computed as ``map.weight(g, v)``; ``g`` and ``v`` are registered
    as given when they are Parameters (kept by optimizers and ties), else wrapped."""
    req = v.requires_grad
    old = module._parameters.pop(name, None)
    if isinstance(old, nn.Parameter) and old is not v and old is not g:
        _replaced(old, where, name)

    def param(t: Tensor) -> nn.Parameter:
        return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=req)

    if map.has_g:
        module.register_parameter(name + "_g", param(g))  # type: ignore[arg-type]
    module.register_parameter(name + "_v", param(v))
    cls = _class_for(type(module))
    _ensure_property(cls, name)
    if "_wn" not in module.__dict__:
        object.__setattr__(module, "_wn", {})
    module.__dict__["_wn"][name] = Slot(name, map, where)
    module.__class__ = cls
    refresh_flat_weights(module)


def plain_weight(map: Map, g: Tensor | None, v: Tensor,
                 tied: dict[int, tuple[Tensor, nn.Parameter]]) -> nn.Parameter:
    """The Parameter holding ``map.weight(g, v)`` (``requires_grad`` as v's): the one ``tied``
    already has for this ``v`` (a tie stays one weight), else a new one, recorded there."""
    seen = tied.get(id(v))
    if seen is not None and seen[0] is v:
        return seen[1]
    with torch.no_grad():
        w = nn.Parameter(map.weight(g, v).detach().clone(), requires_grad=v.requires_grad)
    tied[id(v)] = (v, w)  # v kept alive: its id names it while ``tied`` lives
    return w


def detach(module: nn.Module, name: str,
           tied: dict[int, tuple[Tensor, nn.Parameter]] | None = None) -> None:
    """Undo :func:`attach`: ``module.<name>`` becomes a plain Parameter holding the weight
    (``requires_grad`` as v's); the module gets its class back when nothing stays attached.
    ``tied``, shared across calls, maps a ``v`` already detached elsewhere to its Parameter, so
    that holders of one (g, v) keep one weight."""
    _check_own_class(module)
    specs = module.__dict__["_wn"]
    s = specs[name]
    along = module.__dict__.get("_wn_along")
    if along and name in along:  # adopted with a sibling: a fresh weight_norm is one again
        module.__dict__["_wn_along"] = along - {name}
    land_writes(module)  # a tie's other holders' too: both removals give the written weight
    params = module._parameters
    g, v = pair(module, s)
    w_param = plain_weight(s.map, g, v, {} if tied is None else tied)
    del specs[name]
    params.pop(s.gname, None)
    del params[s.vname]
    params[name] = w_param
    _pytorch_wn.drop_adopted(module, name)  # a plain weight: PyTorch's removal has nothing left
    if not specs:
        del module.__dict__["_wn"]
        module.__class__ = base_class(module)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "wnorm_owned", False):  # e.g. forced WN's check: ours, gone too
                del module._forward_pre_hooks[key]
    refresh_flat_weights(module)


def slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, Slot]]:
    """``(module name, module, slot)`` for every attached parameter in ``model``."""
    for mname, module in model.named_modules():
        for s in module.__dict__.get("_wn", {}).values():
            yield mname, module, s


def slot(module: nn.Module, name: str) -> Slot | None:
    """The slot of ``module.<name>``, or None when it is not attached."""
    return module.__dict__.get("_wn", {}).get(name)


def slots_of(module: nn.Module) -> dict[str, Slot]:
    """``{parameter name: slot}`` of ``module`` itself (empty when nothing is attached)."""
    return module.__dict__.get("_wn", {})
