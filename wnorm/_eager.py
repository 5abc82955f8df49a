"""Functions that run outside any graph torch.compile traces, without importing it for all."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["eager", "graph_break"]

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``fn`` under ``torch.compiler.disable``, wrapped at its first call: decorating at import
    would import torch._dynamo (and numpy) at ``import wnorm``. Traced, the call is a graph
    break and ``fn`` runs eagerly (an exception it raises then leaves the compiled frame whole;
    state it reads, such as a dict of weak references, gets no guards)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        wrapped = fn.__dict__.get("_wnorm_eager")
        if wrapped is None:
            wrapped = fn._wnorm_eager = torch.compiler.disable(fn)  # type: ignore[attr-defined]
        return wrapped(*args, **kwargs)

    return run  # type: ignore[return-value]


#: torch._dynamo.graph_break(msg) (torch 2.8 on; msg is what a fullgraph error shows)
_TAKES_MSG = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def graph_break(why: str) -> None:
    """Under Dynamo, a graph break whose message ``why`` is what ``fullgraph=True`` and strict
    export show; nothing otherwise. torch._dynamo is loaded then: importing it here would load
    it (and numpy) for every user."""
    if torch.compiler.is_dynamo_compiling():
        dynamo = sys.modules["torch._dynamo"]
        dynamo.graph_break(msg=why) if _TAKES_MSG else dynamo.graph_break()
