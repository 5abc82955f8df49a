"""Interleaved timing, peak memory and the environment record.

Every variant of a case runs in the same process, in blocks of ``steps`` calls, one block of each
variant per round for ``repeats`` rounds (the order rotating by one each round), after
``warmup`` calls of each. A variant's time is the median over rounds of (block time / steps);
its ratio is that median over ``plain``'s. Load from other processes hits all variants of a
round alike, which is what makes the ratios usable on a shared machine; the per-round paired
ratios are kept too, to show how noisy each one was. On CUDA a block is timed with CUDA events
recorded on the current stream around it, after a synchronize, so queued work of the block
before is not counted.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["time_block", "calibrate", "interleave", "peak_memory", "loadavg", "environment"]

Fn = Callable[[], Any]
ROOT = Path(__file__).resolve().parent.parent


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def time_block(fn: Fn, steps: int, device: str) -> float:
    """Seconds per call of ``fn``, over one block of ``steps`` calls."""
    if _cuda(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def calibrate(fn: Fn, device: str, block_s: float, max_steps: int = 10_000) -> int:
    """Calls per block so that one block takes about ``block_s`` seconds (at least one)."""
    t = time_block(fn, 1, device)
    n = 1
    while t * n < block_s / 4 and n < max_steps:  # too fast to judge from one call: grow
        n *= 4
        t = time_block(fn, n, device)
    return max(1, min(max_steps, round(block_s / max(t, 1e-9))))


def _quantile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]


def interleave(
    fns: dict[str, Fn], *, repeats: int, warmup: int, block_s: float, device: str,
    baseline: str = "plain",
) -> dict[str, Any]:
    """Time every variant in ``fns`` interleaved; returns raw times, medians, ratios, steps.

    ``steps`` (calls per block) is calibrated on ``baseline`` and used for every variant, so
    each block of a round does the same work.
    """
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if _cuda(device):
        torch.cuda.synchronize()
    steps = calibrate(fns[baseline], device, block_s)
    raw: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            raw[k].append(time_block(fns[k], steps, device))
    med = {k: statistics.median(v) for k, v in raw.items()}
    ratio = {k: v / med[baseline] for k, v in med.items()}
    paired = {}
    for k, v in raw.items():
        rs = [a / b for a, b in zip(v, raw[baseline])]
        paired[k] = {"median": statistics.median(rs), "q25": _quantile(rs, 0.25),
                     "q75": _quantile(rs, 0.75)}
    return {"steps_per_block": steps, "raw_s": raw, "median_s": med, "ratio": ratio,
            "paired_ratio": paired}


class Meter(Protocol):
    """Where :func:`peak_memory` reads memory (``torch.cuda`` has these)."""

    def synchronize(self) -> None: ...
    def memory_allocated(self) -> int: ...
    def reset_peak_memory_stats(self) -> None: ...
    def max_memory_allocated(self) -> int: ...
    def empty_cache(self) -> None: ...


def peak_memory(make: Callable[[], Fn], *, warmup: int = 2, meter: Meter | None = None) -> int:
    """Bytes a training step's variant holds at its peak: model, optimizer state, batch, step.

    ``make()`` builds the variant (model, optimizer, batch) and returns its step; the count
    starts before it is built, and the peak is read during one step after ``warmup`` steps (so
    the optimizer state exists), with nothing else of the variant's alive.
    """
    m = meter if meter is not None else torch.cuda
    gc.collect()
    m.synchronize()
    m.empty_cache()
    before = m.memory_allocated()
    fn = make()
    for _ in range(warmup):
        fn()
    m.synchronize()
    m.reset_peak_memory_stats()
    fn()
    m.synchronize()
    peak = m.max_memory_allocated() - before
    del fn
    gc.collect()
    return peak


# --------------------------------------------------------------------------- environment
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_digest() -> str:
    """sha256 over wnorm/ and bench/ sources: names the code even where no git is (a copy)."""
    h = hashlib.sha256()
    for folder in ("wnorm", "bench"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".cpp", ".h", ".sh"):
                h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [math.nan] * 3


def _cpu_model() -> str:  # experiments.common.cpu_name's twin: bench imports nothing from there
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_settings() -> dict[str, Any]:
    out: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    with warnings.catch_warnings():  # allow_tf32 is deprecated for fp32_precision in new torch
        warnings.simplefilter("ignore")
        out["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        out["cuda_matmul_allow_bf16_reduced_precision_reduction"] = (
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    for name, obj in (("cuda_matmul_fp32_precision", torch.backends.cuda.matmul),
                      ("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None))):
        if obj is not None and hasattr(obj, "fp32_precision"):
            out[name] = obj.fp32_precision
    out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    out["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    return out


def environment(device: str) -> dict[str, Any]:
    import wnorm

    commit = _git("rev-parse", "HEAD") or os.environ.get("BENCH_GIT_COMMIT", "")
    status = _git("status", "--porcelain", "--", "wnorm", "bench") if commit else ""
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
        "git_commit": commit or "unknown (no git here; set BENCH_GIT_COMMIT)",
        "git_commit_from": "git" if _git("rev-parse", "HEAD") else "BENCH_GIT_COMMIT" if commit
        else "none",
        "dirty": bool(status),
        "dirty_files": status.splitlines(),
        "source_sha256": source_digest(),
        "device": device,
        **_matmul_settings(),
    }
    if _cuda(device):
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(cuda_device=p.name, cuda_capability=f"{p.major}.{p.minor}",
                   cuda_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda_multiprocessors=p.multi_processor_count, cuda_version=torch.version.cuda,
                   cudnn_version=torch.backends.cudnn.version())
    return env
