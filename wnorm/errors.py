"""The one exception type wnorm raises for bad input."""

from __future__ import annotations

import math
import numbers

__all__ = ["WnormError", "finite_positive", "expect_module", "refuse_sharded"]


class WnormError(ValueError):
    """Bad input to wnorm: the message names the layer, tensor or file and what was expected.

    A subclass of :class:`ValueError`, so ``except ValueError`` keeps working.
    """


def finite_positive(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), finite and > 0; else None:
    the check behind every "must be a finite number > 0" message."""
    x = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) \
        else math.nan
    return x if 0 < x < math.inf else None


def expect_module(fn: str, obj: object) -> None:
    """Refuse anything but an ``nn.Module`` as ``fn``'s model or layer argument."""
    from torch import nn

    if not isinstance(obj, nn.Module):
        raise WnormError(f"{fn}: expects an nn.Module; got {type(obj).__name__}")


def refuse_sharded(who: str, model: object, then: str) -> None:
    """Refuse a model whose parameters are sharded (DTensors, after FSDP2's ``fully_shard``):
    ``who`` names the call, ``then`` says what to do instead."""
    for mname, module in model.named_modules():  # type: ignore[attr-defined]
        for pname, p in module._parameters.items():
            if p is not None and type(p.data).__name__ == "DTensor":
                raise WnormError(f"{who}: {mname or '<model>'}.{pname} is sharded (a DTensor, "
                                 f"e.g. after FSDP2's fully_shard); {then}")
