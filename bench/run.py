"""Time plain vs weight-normalized models, interleaved in one process; write bench.json + bench.md.

    python -m bench.run                          # full run, CPU: a few minutes
    python -m bench.run --quick --out /tmp/b     # seconds: smoke run for CI
    python -m bench.run --profile mlp.train.adam.b1   # torch.profiler table, plain vs wnorm

Defaults (one block): full mode 25 repeats of ~80 ms blocks after 3 warm-up calls per variant;
quick mode 3 repeats of ~5 ms blocks after 1 warm-up call, convnet width 1/16.
Convnet width: full on CUDA; on CPU the largest of 1, 1/2, 1/4, 1/8 whose plain train step
takes under 0.3 s (unless ``--conv-width`` is given).
Threads: 1 on CPU unless ``--threads`` says otherwise. On a machine shared with other work,
two OpenMP threads on two cores stall whenever the other process preempts one of them (single
calls 10-100x slower); one thread gives stable times and ratios that measure wnorm, not the
scheduler.
"""

from __future__ import annotations

import argparse
import fnmatch
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
from .cases import Case, NotApplicable, cases, make_step

FULL = {"repeats": 25, "warmup": 3, "block_s": 0.08}
QUICK = {"repeats": 3, "warmup": 1, "block_s": 0.005, "conv_width": 1 / 16}
CPU_STEP_BUDGET_S = 0.3


def pick_width(device: str, threads: int) -> tuple[float, str]:
    if device.startswith("cuda"):
        return 1.0, "full width on CUDA"
    case = Case("probe", "convnet", "train", 100, "adam")
    for w in (1.0, 0.5, 0.25, 0.125):
        step, _ = make_step(case, "plain", width=w, device=device)
        step()
        t = min(harness.time_block(step, 1, device) for _ in range(2))
        if t < CPU_STEP_BUDGET_S:
            return w, (f"chosen on CPU as the widest of 1, 1/2, 1/4, 1/8 whose plain train step "
                       f"(batch 100, Adam) took < {CPU_STEP_BUDGET_S} s ({t:.3f} s, "
                       f"{threads} threads)")
    return 0.125, f"CPU: even width 1/8 took {t:.3f} s per train step"


def run_case(case: Case, *, width: float, device: str, cfg: dict[str, Any]) -> dict[str, Any]:
    fns, what, na = {}, {}, {}
    for v in case.variants:
        try:
            fns[v], what[v] = make_step(case, v, width=width, device=device)
        except NotApplicable as e:
            na[v] = str(e)
    res = harness.interleave(fns, repeats=cfg["repeats"], warmup=cfg["warmup"],
                             block_s=cfg["block_s"], device=device)
    return {"name": case.name, "model": case.model, "kind": case.kind, "batch": case.batch,
            "optimizer": case.opt, "bf16": case.bf16, "targets": case.targets,
            "note": case.note, "what": what, "not_applicable": na, **res}


def profile(name: str, *, width: float, device: str, variants: list[str], steps: int) -> None:
    """Print torch.profiler's top ops by self CPU time for each variant of one case."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    match = [c for c in cases(device) if c.name == name]
    if not match:
        raise SystemExit(f"--profile: no case named {name!r}; cases: "
                         + ", ".join(c.name for c in cases(device)))
    case = match[0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for v in variants:
        if v not in case.variants:
            continue
        step, what = make_step(case, v, width=width, device=device)
        for _ in range(5):
            step()
        t = harness.time_block(step, steps, device)
        with tprofile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        print(f"\n=== {name} [{v}] ({what}); {t * 1e3:.3f} ms per call unprofiled, "
              f"{steps} calls profiled ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                        max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny repeats)")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on CPU, see module docstring)")
    p.add_argument("--conv-width", type=float, default=None,
                   help="channel multiplier for the convnet (default: see module docstring)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cases", default="*", help="glob on case names, comma-separated")
    p.add_argument("--profile", metavar="CASE", default=None,
                   help="print a torch.profiler table (plain vs wnorm) for CASE and exit")
    p.add_argument("--profile-variants", default="plain,wnorm")
    p.add_argument("--profile-steps", type=int, default=20)
    a = p.parse_args(argv)

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = a.threads or (usable if a.device.startswith("cuda") else 1) or 1
    torch.set_num_threads(threads)
    # Adam's second moments of near-zero gradients (batch 1) underflow into denormal floats,
    # which x86 CPUs compute ~100x slower: that timed the hardware's denormal path, not the
    # layers (plain Adam at batch 1 ran slower than at batch 32). Flush them, and say so.
    flushed = torch.set_flush_denormal(True)
    cfg: dict[str, Any] = dict(QUICK if a.quick else FULL)
    if a.repeats:
        cfg["repeats"] = a.repeats
    if a.conv_width is not None:
        width, why = a.conv_width, "set with --conv-width"
    elif a.quick:
        width, why = QUICK["conv_width"], "quick mode"
    else:
        width, why = pick_width(a.device, threads)

    if a.profile:
        profile(a.profile, width=width, device=a.device,
                variants=a.profile_variants.split(","), steps=a.profile_steps)
        return 0

    pats = a.cases.split(",")
    todo = [c for c in cases(a.device) if any(fnmatch.fnmatchcase(c.name, q) for q in pats)]
    env = harness.environment(a.device)
    env["flush_denormal"] = flushed
    cfg.update(quick=a.quick, conv_width=width, conv_width_reason=why, cases=a.cases,
               command="python -m bench.run " + shlex.join(argv if argv is not None
                                                             else sys.argv[1:]))
    t0 = time.perf_counter()
    results = []
    for c in todo:
        r = run_case(c, width=width, device=a.device, cfg=cfg)
        results.append(r)
        rs = "  ".join(f"{k} {v:.3f}" for k, v in r["ratio"].items() if k != "plain")
        print(f"{c.name:32s} plain {r['median_s']['plain'] * 1e3:9.3f} ms  {rs}", flush=True)
    env["loadavg_end"] = harness.loadavg()
    env["wall_s"] = time.perf_counter() - t0
    data = {"environment": env, "config": cfg, "cases": results}
    for r in results:  # a ratio that is not a finite positive number is a harness bug
        bad = {k: v for k, v in r["ratio"].items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise SystemExit(f"{r['name']}: non-finite or non-positive ratios {bad}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "bench.md").write_text(report.render(data))
    print(f"wrote {a.out / 'bench.json'} and {a.out / 'bench.md'} in {env['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
