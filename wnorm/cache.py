r"""An explicit inference cache: compute every normalized weight once, :math:`w = g\,v/\lVert v\rVert`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._reparam import CACHE, end_block, watch_steps

__all__ = ["cached"]


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
    watch_steps()
    CACHE.on += 1
    try:
        yield
    finally:
        CACHE.on -= 1
        if CACHE.on == 0:
            end_block()
