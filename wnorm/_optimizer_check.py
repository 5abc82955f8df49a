r"""The warning for an optimizer built before weight normalization replaced the Parameters it
holds: they get no gradient, and it trains only the layers' biases.

:func:`replaced` records each Parameter that :func:`wnorm._reparam.attach` takes out of a
module; at an optimizer's first step, a global step pre-hook looks for them in its groups.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .errors import warn_at_user

__all__ = ["replaced"]


#: id -> (weak reference, where) of the Parameters that weight normalization replaced: an
#: optimizer built before holds them, and trains nothing of those layers but their biases
_REPLACED: dict[int, tuple[Any, str]] = {}
_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers already looked at
_CHECKING: list[Any] = []


def replaced(p: nn.Parameter, where: str, name: str) -> None:
    key = id(p)
    _REPLACED[key] = (weakref.ref(p, lambda _: _REPLACED.pop(key, None)), f"{where} {name!r}")
    if not _CHECKING:  # once; importing torch.optim at import wnorm would cost every user
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _CHECKING.append(register_optimizer_step_pre_hook(_check_optimizer))


def _check_optimizer(optimizer: Any, *_: Any) -> None:
    """At an optimizer's first step: warn when it holds Parameters that weight normalization
    replaced (built before wnorm.apply): they get no gradient, and it trains only biases."""
    if torch.compiler.is_compiling() or not _REPLACED or optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    stale = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _REPLACED.get(id(p))
            if entry is not None and entry[0]() is p:
                stale.append(entry[1])
    if stale:
        warn_at_user(
            f"{type(optimizer).__name__} holds {len(stale)} Parameters that weight "
            f"normalization replaced ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}):"
            " it was built before wnorm.apply (or weight_norm), and trains nothing of those "
            "layers but their biases; build the optimizer after wnorm.apply")


