"""Time plain vs weight-normalized models, interleaved in one process; write bench.json + bench.md.

    python -m bench.run --out results/bench/cpu                # CPU rows, 1 thread: ~5 minutes
    python -m bench.run --device cuda --out results/bench/cuda # GPU rows (bench/gpu.sh)
    python -m bench.run --quick --out /tmp/b                   # tiny sizes: checks that all runs
    python -m bench.run --device cpu --rows cuda --quick       # the GPU rows' logic, on the CPU
                                                               # (into runs/bench/cuda)
    python -m bench.run --profile mlp4x256.train.sgd.b1        # torch.profiler, plain vs wnorm
    python -m bench.report --summary results/bench             # results/bench/bench.md

Defaults: CPU rows 25 interleaved repeats of ~80 ms blocks after 3 warm-up calls per variant;
CUDA rows 15 repeats of ~60 ms blocks after 5 warm-up calls; ``--quick`` 3 repeats of ~5 ms
blocks after 1 warm-up call, at the tiny sizes of ``bench.cases.SIZES``.
Sizes are fixed per row list (``bench.cases.SIZES``): the CUDA rows use the full models, the CPU
rows the convnet at 1/4 width and HiFi-GAN at 1/4 width (``--conv-width`` overrides the convnet's).
Threads: 1 on CPU unless ``--threads`` says otherwise. On a machine shared with other work,
two OpenMP threads on two cores stall whenever another process preempts one of them; one thread
gives ratios that measure wnorm, not the scheduler.
The results are written after every case, so a run cut short (``--time-limit``, or killed) still
leaves every finished row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import harness, report
from .cases import (SIZES, Case, NotApplicable, Sizes, Step, cases, make_step,
                    skip_reason)

CONFIG = {
    "cpu": {"repeats": 25, "warmup": 3, "block_s": 0.08},
    "cuda": {"repeats": 15, "warmup": 5, "block_s": 0.06},
    "quick": {"repeats": 3, "warmup": 1, "block_s": 0.005},
}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _first_calls(steps: dict[str, Step], device: str, compiled: bool) -> dict[str, Any]:
    """Each variant's first call: seconds (compilation, for compiled rows) and dynamo's counts.

    After the reset that starts a compiled row, a variant whose first call made no new graph ran
    eagerly (dynamo gave up on it): its row would compare eager code with compiled plain, so
    that is an error.
    """
    from torch._dynamo.utils import counters

    out: dict[str, Any] = {}
    for v, s in steps.items():
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        t0 = time.perf_counter()
        s.fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[v] = {"seconds": time.perf_counter() - t0}
        if compiled:
            out[v].update(graphs=counters["stats"]["unique_graphs"] - graphs,
                          graph_breaks=sum(counters["graph_break"].values()) - breaks)
            if out[v]["graphs"] < 1:
                raise SystemExit(f"{v}: torch.compile made no graph at the first call; it ran "
                                 "eagerly (TORCH_LOGS=recompiles says why)")
    return out


def run_case(case: Case, *, sizes: Sizes, device: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One row: every variant of ``case``, interleaved (or, for memory rows, one by one)."""
    row: dict[str, Any] = {
        "name": case.name, "model": case.model, "kind": case.kind, "batch": case.batch,
        "frames": case.frames, "optimizer": case.opt, "bf16": case.bf16,
        "compile": case.compile, "variants": list(case.variants), "targets": case.targets,
        "loadavg_before": harness.loadavg(),
    }
    reason = skip_reason(case, device)
    if reason:
        return {**row, "skipped": reason}
    what: dict[str, str] = {}
    na: dict[str, str] = {}
    t0 = time.perf_counter()
    if case.kind == "memory":
        peaks: dict[str, int] = {}
        for v in case.variants:
            try:
                what[v] = make_step(case, v, sizes, device).what
                _free(device)
                peaks[v] = harness.peak_memory(
                    lambda v=v: make_step(case, v, sizes, device).fn)  # type: ignore[misc]
            except NotApplicable as e:
                na[v] = str(e)
            _free(device)
        res: dict[str, Any] = {"peak_bytes": peaks,
                               "ratio": {v: p / peaks["plain"] for v, p in peaks.items()}}
    else:
        steps = {}
        for v in case.variants:
            try:
                steps[v] = make_step(case, v, sizes, device)
                what[v] = steps[v].what
            except NotApplicable as e:
                na[v] = str(e)
        if case.compile:  # fresh caches: Sequential.forward's compiled entries would pile
            torch._dynamo.reset()  # up over rows until dynamo's recompile limit (8) hit
        with contextlib.ExitStack() as held:
            for s in steps.values():
                held.enter_context(s.context())
            first = _first_calls(steps, device, case.compile)
            res = harness.interleave({v: s.fn for v, s in steps.items()}, repeats=cfg["repeats"],
                                     warmup=cfg["warmup"], block_s=cfg["block_s"], device=device)
        res["first_call"] = first
        del steps
        _free(device)
    return {**row, "what": what, "not_applicable": na, **res,
            "wall_s": time.perf_counter() - t0, "loadavg_after": harness.loadavg()}


def profile(name: str, todo: list[Case], *, sizes: Sizes, device: str, variants: list[str],
            steps: int) -> None:
    """Print torch.profiler's top ops by self time for each variant of one case."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    match = [c for c in todo if c.name == name]
    if not match:
        raise SystemExit(f"--profile: no case named {name!r}; cases: "
                         + ", ".join(c.name for c in todo))
    case = match[0]
    unknown = [v for v in variants if v not in case.variants]
    if unknown:  # a typo printed nothing and exited 0
        raise SystemExit(f"--profile-variants: {case.name} has no variant {unknown[0]!r}; its "
                         f"variants: {', '.join(case.variants)}")
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for v in variants:
        s = make_step(case, v, sizes, device)
        with s.context():
            for _ in range(5):
                s.fn()
            t = harness.time_block(s.fn, steps, device)
            with tprofile(activities=acts) as prof:
                for _ in range(steps):
                    s.fn()
                if cuda:
                    torch.cuda.synchronize()
        print(f"\n=== {name} [{v}] ({s.what}); {t * 1e3:.3f} ms per call unprofiled, "
              f"{steps} calls profiled ===")
        print(prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20,
            max_name_column_width=44))


def _write(out: Path, data: dict[str, Any]) -> None:
    """bench.json and bench.md, each written whole or not at all (a temporary file, then
    renamed): a run killed while writing keeps the rows of the last write."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps(data, indent=1) + "\n"),
                       ("bench.md", report.render(data))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", choices=("cpu", "cuda"), default=None,
                   help="whose case list and targets (default: the device's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke run")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for bench.json and bench.md (default runs/bench/<rows>: the "
                        "committed results/bench/<rows> is replaced only when named)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--conv-width", type=float, default=None,
                   help="channel multiplier for the convnet (default: see the module docstring)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the torch.compile rows (default: on for CUDA rows, off for CPU rows)")
    p.add_argument("--cases", default="*", help="glob(s) on case names, comma-separated")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no case after S seconds; the rest are marked skipped")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--profile", metavar="CASE", default=None,
                   help="print a torch.profiler table per variant for CASE and exit")
    p.add_argument("--profile-variants", default="plain,wnorm,torch-new")
    p.add_argument("--profile-steps", type=int, default=20)
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: this torch ({torch.__version__}) sees no CUDA device")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be at least 1; got {a.threads}")
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats must be at least 1; got {a.repeats}")
    if a.time_limit is not None and not a.time_limit > 0:  # else every case is skipped
        p.error(f"--time-limit must be > 0 seconds; got {a.time_limit:g}")
    rows = a.rows or ("cuda" if a.device.startswith("cuda") else "cpu")
    # not results/: a smoke run (--quick, --rows cuda on a CPU) written there replaced the
    # committed table, which the README is generated from
    out = a.out or Path("runs/bench") / rows
    if a.conv_width is not None and not a.conv_width > 0:
        p.error(f"--conv-width must be > 0; got {a.conv_width}")
    if a.profile_steps < 1:
        p.error(f"--profile-steps must be at least 1; got {a.profile_steps}")

    sizes = SIZES[f"quick-{rows}" if a.quick else rows]
    pats = a.cases.split(",")
    todo = [c for c in cases(rows, sizes, compile=a.compile)
            if any(fnmatch.fnmatchcase(c.name, q) for q in pats)]
    if not todo:
        p.error(f"--cases {a.cases!r} matches no case; --list shows them")
    if a.list:
        print("\n".join(c.name for c in todo))
        return 0
    if a.profile is None:  # else found after the first case, with a traceback
        blocked = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
        if blocked is not None:
            p.error(f"--out {out}: {blocked} is a file; expected a folder for bench.json and "
                    "bench.md")

    if a.threads or not a.device.startswith("cuda"):
        torch.set_num_threads(a.threads or 1)
    # Adam's second moments of near-zero gradients (batch 1) underflow into denormal floats,
    # which x86 CPUs compute ~100x slower: that would time the hardware's denormal path, not
    # the layers. Flush them, and say so.
    flushed = torch.set_flush_denormal(True)
    cfg: dict[str, Any] = dict(CONFIG["quick" if a.quick else rows])
    if a.repeats:
        cfg["repeats"] = a.repeats
    if a.conv_width is not None:
        sizes, why = dataclasses.replace(sizes, conv_width=a.conv_width), "set with --conv-width"
    else:
        why = ("quick mode" if a.quick else "the paper's full width" if rows == "cuda"
               else "a 1-thread CPU's share of the paper's width")
    if a.profile:
        args = shlex.join(argv if argv is not None else sys.argv[1:])
        print(f"Command: python -m bench.run {args} ({torch.get_num_threads()} thread(s), torch "
              f"{torch.__version__}, load average {harness.loadavg()[0]:.2f}; self times move "
              "with the machine's load, the ops and call counts do not)")
        profile(a.profile, todo, sizes=sizes, device=a.device,
                variants=a.profile_variants.split(","), steps=a.profile_steps)
        return 0

    env = harness.environment(a.device)
    env["flush_denormal"] = flushed
    cfg.update(rows=rows, quick=a.quick, sizes=dataclasses.asdict(sizes), conv_width_reason=why,
               cases=a.cases, compile=a.compile, time_limit_s=a.time_limit,
               command="python -m bench.run " + shlex.join(argv if argv is not None
                                                             else sys.argv[1:]))
    data: dict[str, Any] = {"environment": env, "config": cfg, "cases": []}
    t0 = time.perf_counter()
    for c in todo:
        if a.time_limit is not None and time.perf_counter() - t0 > a.time_limit:
            r: dict[str, Any] = {"name": c.name, "model": c.model, "kind": c.kind,
                                 "targets": c.targets, "variants": list(c.variants),
                                 "skipped": f"--time-limit {a.time_limit:g} s reached"}
        else:
            r = run_case(c, sizes=sizes, device=a.device, cfg=cfg)
            bad = {k: v for k, v in r.get("ratio", {}).items()
                   if not (math.isfinite(v) and v > 0)}
            if bad:  # a ratio that is not a finite positive number is a harness bug
                raise SystemExit(f"{c.name}: non-finite or non-positive ratios {bad}")
        data["cases"].append(r)
        env["loadavg_end"] = harness.loadavg()
        env["wall_s"] = time.perf_counter() - t0
        _write(out, data)
        print(report.line(r), flush=True)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {env['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
