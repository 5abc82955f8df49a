"""Shared fixtures for wnorm's tests: a fixed seed per test, small thread count, helpers."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)  # the CI machine has 2 shared cores: no oversubscription


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so a failure reproduces on its own."""
    torch.manual_seed(0)


def unit_rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """View ``t`` as (units, k): one row per slice along ``dim`` (one row for ``dim=None``)."""
    if dim is None:
        return t.reshape(1, -1)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


@pytest.fixture
def rows():
    """The :func:`unit_rows` helper, as a fixture (tests/ is not a package)."""
    return unit_rows


def copy_as(obj: Any, how: str) -> Any:
    """A copy of ``obj``: ``copy.deepcopy`` for ``how="deepcopy"``, otherwise (the tests say
    "torch.save", "save" or "pickle") a ``torch.save``/``torch.load`` round trip."""
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.fixture
def copied():
    """The :func:`copy_as` helper, as a fixture."""
    return copy_as


def normalized_weights(model: torch.nn.Module):
    """``(module name, module, parameter name, dim)`` of every weight wnorm normalizes."""
    from wnorm._slot import slots

    for mname, module, s in slots(model):
        yield mname, module, s.name, s.map.dim


def spawn_ranks(worker: Callable[[int], dict], world: int, out: Path) -> list[dict]:
    """``worker(rank)`` in each of ``world`` processes, one gloo group on 127.0.0.1 (a free
    port, one thread each); returns each rank's dict (saved to ``out/rank<r>.pt``, loaded)."""
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank, args=(worker, world, port, str(out)), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _rank(rank: int, worker: Callable[[int], dict], world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # a collective one rank never reaches fails in 2 minutes rather than gloo's 30
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(worker(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def readme_example(name: str) -> str:
    """The README's code block marked ``<!-- example: NAME -->``: the tests run what it says."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", text, re.S)
    if m is None:
        raise LookupError(f"README.md has no example marked {name!r}")
    return m.group(1)
