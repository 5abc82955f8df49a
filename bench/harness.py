"""Interleaved timing and the environment record.

Every variant of a case runs in the same process, in blocks of ``steps`` calls, in the order
A B C A B C ... for ``repeats`` rounds, after ``warmup`` calls of each. A variant's time is the
median over rounds of (block time / steps); its ratio is that median over ``plain``'s. Load from
other processes hits all variants of a round alike, which is what makes the ratios usable on a
shared machine; the per-round paired ratios are kept too, to show how noisy each one was.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Step = Callable[[], Any]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(fn: Step, steps: int, device: str) -> float:
    """Seconds per call of ``fn``, over one block of ``steps`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def calibrate(fn: Step, device: str, block_s: float, max_steps: int = 10_000) -> int:
    """Calls per block so that one block takes about ``block_s`` seconds (at least one)."""
    t = time_block(fn, 1, device)
    n = 1
    while t * n < block_s / 4 and n < max_steps:  # too fast to judge from one call: grow
        n *= 4
        t = time_block(fn, n, device)
    return max(1, min(max_steps, round(block_s / max(t, 1e-9))))


def interleave(
    fns: dict[str, Step], *, repeats: int, warmup: int, block_s: float, device: str,
    baseline: str = "plain",
) -> dict[str, Any]:
    """Time every variant in ``fns`` interleaved; returns raw times, medians, ratios, steps.

    ``steps`` (calls per block) is calibrated on ``baseline`` and used for every variant, so
    each block of a round does the same work.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    steps = calibrate(fns[baseline], device, block_s)
    raw: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            raw[name].append(time_block(fn, steps, device))
    med = {k: statistics.median(v) for k, v in raw.items()}
    base = med[baseline]
    ratio = {k: v / base for k, v in med.items()}
    paired = {}
    for k, v in raw.items():
        rs = sorted(a / b for a, b in zip(v, raw[baseline]))
        q = lambda p: rs[min(len(rs) - 1, max(0, round(p * (len(rs) - 1))))]  # noqa: E731
        paired[k] = {"median": statistics.median(rs), "q25": q(0.25), "q75": q(0.75)}
    return {"steps_per_block": steps, "raw_s": raw, "median_s": med, "ratio": ratio,
            "paired_ratio": paired}


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    from experiments.common import cpu_name

    return cpu_name()


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [math.nan] * 3


def environment(device: str) -> dict[str, Any]:
    import wnorm

    dirty = _git("status", "--porcelain", "--", "wnorm")
    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": loadavg(),
        "wnorm_version": wnorm.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "wnorm_dirty": bool(dirty),
        "device": device,
    }
    if device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda_version"] = torch.version.cuda
    return env
