"""The one exception type wnorm raises for bad input, and how its warnings name the user's line."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch

__all__ = ["WnormError", "finite_positive", "expect_module", "refuse_sharded", "warn_at_user"]


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


#: the frames a warning skips to name the user's line: reached from a forward or state_dict(),
#: the flush runs under torch's frames as well as wnorm's, and at a fork under
#: multiprocessing's (Python 3.12's skip_file_prefixes does this, but wnorm supports 3.10)
_INTERNAL = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__)) + (
    os.path.join(os.path.dirname(os.__file__), "multiprocessing") + os.sep,
    os.path.join(os.path.dirname(os.__file__), "contextlib.py"))  # a block's end


def warn_at_user(message: str) -> None:
    """A UserWarning naming the first frame outside wnorm and torch (a computed stacklevel
    would count frames torch.compile's frame evaluation adds, and name torch's)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace frame access: it names its line
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    f = sys._getframe(1)
    while f.f_back is not None and f.f_code.co_filename.startswith(_INTERNAL):
        f = f.f_back
    warnings.warn_explicit(message, UserWarning, f.f_code.co_filename, f.f_lineno,
                           module=f.f_globals.get("__name__"),
                           registry=f.f_globals.setdefault("__warningregistry__", {}))


