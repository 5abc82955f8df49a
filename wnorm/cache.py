r"""An explicit inference cache: compute every normalized weight once, :math:`w = g\,v/\lVert v\rVert`.

Outside a :func:`cached` block every access computes the weight; inside, :func:`weight` hands
out the one cached for the slot while g and v are unchanged, with one autograd node
(:class:`CachedWeight`) for every forward that reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ._slot import Slot, addresses, key_of, version_of
from .errors import warn_at_user
from .maps import Map

__all__ = ["cached"]


class _Cache(threading.local):
    """State of :func:`wnorm.cached` in this thread: nesting depth and the slots it filled. A
    block covers the thread that opened it: other threads keep computing every weight."""

    def __init__(self) -> None:
        self.on = 0
        self.filled: list[Slot] = []


CACHE = _Cache()


def _end_block() -> None:
    """Release the weights of the outermost :func:`wnorm.cached` block, saying which were
    written in place in it (their version moved): the block's forwards used the write, but g
    and v do not hold it, and it goes with the cached weight."""
    for s in CACHE.filled:
        say_if_written(s)
        s.cached, s.key = None, ()
    CACHE.filled.clear()


def say_if_written(s: Slot) -> None:
    """Warn when the weight ``s`` cached was written in place: it is let go (at the block's
    end, or computed again after a step or for a forward recording a graph) with the write."""
    w = s.cached
    if w is not None and s.cached_at >= 0 and version_of(w) != s.cached_at:
        warn_at_user(
            f"{s.where}: '{s.name}' was written in place inside a wnorm.cached() block: the "
            f"block's forwards used the written weight (if any ran since), but "
            f"'{s.gname}'/'{s.vname}' do not hold it, and it is gone now; write it outside "
            "the block (it is then split into them at the next access)")


#: optimizer steps taken, in any thread: a cached weight is valid for the count it was cached
#: at (a step in autograd's thread, an optimizer-in-backward hook's, refreshes a block opened
#: in the main thread; a thread-local flag would not see it)
STEPS = [0]


def _after_step(*_: Any) -> None:
    """After any optimizer's step, the weights of :func:`wnorm.cached` blocks are computed
    again: fused steps (``Adam(fused=True)``, ``SGD(fused=True)``) update g and v without moving
    their version counters, on which the cache is keyed, and a block training with one kept
    the weight of before its first step."""
    STEPS[0] += 1


_WATCHING: list[Any] = []


def _watch_steps() -> None:
    """Register :func:`_after_step` with every optimizer, once (at the first block: importing
    torch.optim at ``import wnorm`` would cost every user)."""
    if not _WATCHING:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _WATCHING.append(register_optimizer_step_post_hook(_after_step))


class CachedWeight(torch.autograd.Function):
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


def cache_key(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    """What a cached weight is valid for: g and v, their versions and the addresses and layouts
    of their data (a ``param.data = ...`` assignment, as ``vector_to_parameters`` and ``.to()``
    make to every parameter, moves no version). Aliases of g and v pin that data while the key
    lives: freed, its address could be handed to the next assignment's data."""
    return key_of(g, v) + (addresses(g, v), None if g is None else g.detach(), v.detach())


@contextmanager
def cached() -> Iterator[None]:
    r"""Inside the block, each normalized weight is computed at its first access and reused.

    Outside it, wnorm computes every weight from g and v at every access, so that edits of g
    and v by any means are seen. Inside, a weight is recomputed only when its g or v is
    replaced, assigned through ``.data`` or changed in place (their version counters move),
    and after every optimizer step (fused ones, which move no version counter, too, and steps
    in other threads: an optimizer-in-backward hook's, in autograd's thread); an
    in-place edit through ``.data`` inside the block is not seen. Use it for inference (a
    plain layer's cost per forward), or to compute a weight once when a layer runs many times
    (an RNN cell over time steps, gradient accumulation). With grad enabled, every forward
    reading a cached weight shares one autograd node whose backward recomputes the weight's
    vector-Jacobian product from g and v, so backward passes in any order (two forwards, then
    two backward passes), double backward and activation checkpointing (its forward and
    backward both in the block) give the gradients they give outside it, with no host sync; a weight cached under ``no_grad`` is
    computed again for a forward that records a graph, and is checked for NaN and inf once (a
    host sync per weight and block). Under ``torch.func`` transforms, and for a g or v computed
    in the graph (MAML's fast weights), nothing is cached. The
    cached weights are released when the block ends. Like
    PyTorch's ``torch.nn.utils.parametrize.cached``, it covers every model; blocks nest; unlike
    it, a block covers only the thread that opened it. A forward compiled by ``torch.compile``
    caches nothing in the block: its graph computes a weight at each access, as outside it
    (the check of a cached weight reads version counters, which a graph cannot branch on).
    A weight written in place in a block (``nn.init`` on it) is used by the block's forwards
    but never reaches g and v: a warning says so when the block lets it go (at its end, after a
    step, or computing it again for a forward that records a graph); write outside a block.

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
        >>> with torch.no_grad(), wnorm.cached():
        ...     y = net(torch.randn(3, 4))
        ...     net[0].weight is net[0].weight
        True
        >>> net[0].weight is net[0].weight  # outside the block: computed at every access
        False
    """
    _watch_steps()
    CACHE.on += 1
    try:
        yield
    finally:
        CACHE.on -= 1
        if CACHE.on == 0:
            _end_block()
