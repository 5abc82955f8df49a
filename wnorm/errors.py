"""The one exception type wnorm raises for bad input."""

from __future__ import annotations

__all__ = ["WnormError"]


class WnormError(ValueError):
    """Bad input to wnorm: the message names the layer, tensor or file and what was expected.

    A subclass of :class:`ValueError`, so ``except ValueError`` keeps working.
    """
