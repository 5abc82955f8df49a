r"""The classification experiment at full scale on one GPU: all of Fashion-MNIST, the paper's
network at full width, 5 variants x 3 seeds x 30 epochs, planned to finish in under 9 minutes
on one H200.

Commands (from the repository root)::

    # the full comparison, then its report (run folders and report under --out)
    python -m experiments.classify_gpu --out runs/classify-gpu
    # timing: seconds per epoch per variant relative to normal, eager and compiled, each
    # variant alone on the GPU while it is timed (interleaved rounds)
    python -m experiments.classify_gpu --timing --out runs/classify-gpu-timing
    # the plan below, recomputed (no GPU needed)
    python -m experiments.classify_gpu --plan
    # tiny, on a CPU (what the tests run)
    python -m experiments.classify_gpu --device cpu --width 0.05 --train-subset 200 \
        --test-subset 100 --epochs 2 --init-examples 50 --out runs/tiny

Same network, data, optimizer, schedule, data init and run-folder format as
:mod:`experiments.classify`, so :mod:`experiments.report` reads both. What makes it fast
(:mod:`experiments.stack_trainer`; the timing mode is :mod:`experiments.gpu_timing`):

- the dataset lives on the device; a step gathers its batch there from an index (each epoch's
  data order is drawn on the host, as in ``classify``, and copied once per epoch); input noise
  and dropout are drawn on the device; losses and errors accumulate on the device, so the
  steps never wait for it (one wait per epoch, for that epoch's numbers);
- a variant's seeds train as one network (``--stack`` seeds side by side as grouped
  convolutions, :mod:`experiments.seed_stack`), so one launch does three seeds' work; each
  seed's forward, gradients and steps are its own network's, and its noise and dropout come
  from its own generator on the device, seeded as ``experiments.classify`` seeds that seed's
  run: a seed's numbers do not depend on its stack (on a CPU they are ``classify``'s; on CUDA
  the dropout masks come from another kernel than ``nn.Dropout``'s). torch.compile cannot
  trace a draw from a generator: each step's draws are made eagerly before its compiled loss
  (:func:`experiments.seed_stack.draw_ahead`), which is then one graph;
- the loss is compiled (``--compile``, torch.compile; ``reduce-overhead`` adds CUDA graphs);
  should compiling fail, the run says so in its log and config and goes on eagerly;
- bf16 autocast and channels-last (``--bf16``, ``--channels-last``; on by default on CUDA);
  TF32 (``--tf32``) for what stays in float32; each run's config.json records what it used;
- ``--procs`` worker processes at once, the stacks dealt among them (default: five, one per
  variant): their compilation and host work overlap, and while one waits on its host side
  the GPU runs another's kernels.

The plan, before any measurement, as ``python -m experiments.classify_gpu --plan`` prints it
(:mod:`experiments.gpu_plan`: FLOPs counted by torch's FlopCounterMode, activations by forward
hooks; the two rates are this workplace's measured H200 ceilings, times the efficiencies
assumed in :data:`PLAN`; a test checks this block against it). The full run writes
``harness.json`` with the measured step and epoch times beside these numbers.

.. plan-begin

=========== ========== ============ ======== ======== =======
variant     GFLOP/step act. GB/step step ms  epoch s  run s
=========== ========== ============ ======== ======== =======
normal      545.8      2.29         3.02     1.91     57.4
weightnorm  545.8      2.29         3.02     1.91     57.4
batchnorm   545.8      3.35         3.43     2.17     65.2
wn+meanonly 545.8      3.35         3.43     2.17     65.2
meanonly    545.8      3.35         3.43     2.17     65.2
=========== ========== ============ ======== ======== =======

A step trains 3 seeds at once (batch 100 each); 600 steps per epoch (60000 images), 30 epochs:
18000 steps per process, 5 processes at once, time-sliced on one GPU (no kernel of one runs
beside another's, so their GPU times add up). Predicted: 310 s on the GPU + 90 s of start-up
and compilation = 400 s (6.7 min). Break-even: the 9-minute budget holds while the convolutions
run at 20% or more of the bf16 rate (the plan assumes 35%).

.. plan-end
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .classify import Config, run_dir_name
from .common import (add_options, add_run_flags, check_out, config_from_args, hardware,
                     keep_earlier, pending, read_jsonl, split_list)
from .data import ImageData, load
from .gpu_plan import plan, plan_text
from .gpu_timing import time_variants, timing_text
from .nets import PAPER_VARIANTS
from .seed_stack import STACKABLE
from .stack_trainer import check_gpu, resolved, train_stack

__all__ = ["GPUConfig", "PLAN", "VARIANTS", "run_all", "main"]


# --------------------------------------------------------------------------- defaults
@dataclass
class GPUConfig(Config):
    """One run of the full-scale comparison: the paper's settings on all of Fashion-MNIST."""

    epochs: int = 30
    device: str = "auto"
    eval_batch_size: int = 2000
    progress: bool = False
    compile: str = "auto"  # auto (default on CUDA, off on CPU) | off | default | reduce-overhead
    bf16: bool | None = None  # bf16 autocast; None: on for CUDA, off for CPU
    channels_last: bool | None = None  # None: on for CUDA, off for CPU
    tf32: bool = True  # TF32 for float32 matmuls and convolutions on CUDA
    stack: int = 3  # seeds of a variant trained as one network
    procs: int = 5  # processes at once

    def resolved(self) -> GPUConfig:
        """A copy with every ``auto``/``None`` made explicit for its device."""
        c = super().resolved()
        cuda = c.device.startswith("cuda")
        if c.compile == "auto":
            c.compile = "default" if cuda else "off"
        if c.bf16 is None:
            c.bf16 = cuda
        if c.channels_last is None:
            c.channels_last = cuda
        return c


VARIANTS = PAPER_VARIANTS
SEEDS = "0,1,2"
#: The plan's assumptions. Rates: this workplace's H200 measured (device KINDS.md: a bf16
#: 8192^3 matmul at 788 TFLOP/s, a device copy at 4.3 TB/s); the efficiencies and the rest are
#: guesses to be checked against harness.json.
PLAN = {
    "bf16_flops_per_s": 788e12,
    "bytes_per_s": 4.3e12,
    "conv_efficiency": 0.35,  # of the matmul rate, for 3x3 convs of 96-192 channels
    "memory_efficiency": 0.6,
    "activation_passes": 5,  # forward write + read, backward read + gradient write + read
    "bytes_per_element": 2,  # bf16
    "overhead_ms_per_step": 0.15,  # launch gaps not hidden by the other processes
    "startup_s": 90.0,  # data load, model build, compilation (in parallel across processes)
    "budget_s": 540.0,
}


# --------------------------------------------------------------------------- processes
def _stacks(configs: list[GPUConfig]) -> list[list[GPUConfig]]:
    """Each variant's seeds in stacks of ``stack``, seed-major (all variants' first stacks,
    then their second ones ...), so that every variant progresses alike."""
    by_variant = {}
    for v in dict.fromkeys(c.variant for c in configs):
        mine = [c for c in configs if c.variant == v]
        k = mine[0].stack
        by_variant[v] = [mine[i:i + k] for i in range(0, len(mine), k)]
    rounds = max(len(st) for st in by_variant.values())
    return [st[r] for r in range(rounds) for st in by_variant.values() if r < len(st)]


def _load(cfg: GPUConfig) -> ImageData:
    return load(cfg.dataset, cfg.data_dir, train_subset=cfg.train_subset,
                test_subset=cfg.test_subset, zca=cfg.resolved().zca, download=cfg.download)


def run_all(configs: list[GPUConfig], *, overwrite: bool = False,
            resume: bool = False) -> dict[str, Any]:
    """Train every config (with ``resume``, those whose run folder holds no finished run:
    :func:`~experiments.common.pending`): stacks of seeds dealt round-robin to ``procs`` worker
    processes that run at once, each training its stacks one after the other (in this process
    when ``procs`` is 1). Returns what ``harness.json`` records: wall times, and the runs kept.

    Raises:
        WnormError: a run folder already holds a run, or a finished one another setting (before
            anything trains), or a worker failed (naming it and its log).
    """
    todo = pending(configs, lambda c: Path(c.out) / run_dir_name(c), overwrite=overwrite,
                   resume=resume)
    kept = [run_dir_name(c) for c in configs if c not in todo]
    configs, overwrite = todo, overwrite or resume
    if not configs:
        return {"wall_s": 0.0, "processes_at_once": 0, "stacks": [], "kept": kept}
    stacks = _stacks(configs)
    procs = min(configs[0].procs, len(stacks))
    out = Path(configs[0].out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if procs == 1:
        data = _load(configs[0])
        for st in stacks:
            train_stack(st, data, overwrite=overwrite)
    else:
        # read once here first: a data error (files missing, the download failed) is this
        # command's own message, and a download happens once, not in every worker
        _load(configs[0])
        root = Path(__file__).resolve().parent.parent
        env = os.environ | {"PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        threads = max(1, (os.cpu_count() or 1) // procs)
        running = []
        for w in range(procs):
            mine = stacks[w::procs]
            spec = {"stacks": [[asdict(c) | {"threads": c.threads or threads} for c in st]
                               for st in mine], "overwrite": overwrite}
            # each worker prints whole lines to this stdout; its stderr goes to a file
            logf = (out / f"worker-{w}.log").open("w")
            proc = subprocess.Popen([sys.executable, "-m", "experiments.classify_gpu",
                                     "--job", json.dumps(spec)], cwd=root, env=env, stderr=logf)
            running.append((proc, logf, [_job_name(st) for st in mine]))
        failed = []
        for proc, logf, names in running:
            proc.wait()
            logf.close()
            if proc.returncode != 0:
                last = _last_line(Path(logf.name))
                failed.append(f"the worker for {'; '.join(names)} exited with "
                              f"{proc.returncode}" + (f": {last}" if last else "")
                              + f" (see {logf.name})")
            elif os.path.getsize(logf.name) == 0:
                os.remove(logf.name)  # nothing went to stderr: no file to keep
        if failed:
            raise WnormError("; ".join(failed))
    return {"wall_s": time.perf_counter() - t0, "processes_at_once": procs,
            "stacks": [_job_name(st) for st in stacks], "kept": kept}


def _last_line(log: Path) -> str:
    """The last non-empty line of a worker's stderr log (its error, or a traceback's last
    line), at most 300 characters; empty when there is none."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line), "")
    return last.removeprefix("error: ")[:300]


def _job_name(job: list[GPUConfig]) -> str:
    return f"{job[0].variant} s{','.join(str(c.seed) for c in job)}"


def _job_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    stacks = [[GPUConfig(**c) for c in st] for st in spec["stacks"]]
    try:
        data = _load(stacks[0][0])
        for st in stacks:
            train_stack(st, data, overwrite=spec["overwrite"])
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- command line
def _measured(configs: list[GPUConfig], p: dict[str, Any], procs: int) -> dict[str, Any]:
    """Per variant, from the run folders: median seconds per epoch over epochs 2 on (epoch 1
    holds the compilation), with evaluation and without, and per stacked step. The plan's
    times are for a variant alone on the GPU; ``procs`` processes time-sliced on it take, per
    epoch of each, about the sum of their times alone: ``planned_epoch_s_shared``."""
    shared = sum(r["epoch_s"] for r in p["variants"].values()) if procs > 1 else None
    out = {}
    for v in dict.fromkeys(c.variant for c in configs):
        c = next(c for c in configs if c.variant == v)
        rows = [r for r in read_jsonl(Path(c.out) / run_dir_name(c) / "metrics.jsonl")
                if not r.get("diverged")]
        rows = rows[1:] or rows
        if not rows:
            continue
        train = statistics.median(r["seconds"] for r in rows)
        planned = p["variants"].get(v, {})
        out[v] = {"step_ms": 1e3 * train / p["steps_per_epoch"],
                  "epoch_s": statistics.median(r["seconds"] + r["eval_seconds"] for r in rows),
                  "planned_step_ms_alone": planned.get("step_ms"),
                  "planned_epoch_s_alone": planned.get("epoch_s"),
                  "planned_epoch_s_shared": shared}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.classify_gpu",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, some of {', '.join(STACKABLE)} (default: %(default)s)")
    p.add_argument("--seeds", default=SEEDS, help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default="runs/classify-gpu",
                   help="parent folder of the run folders, harness.json and report/ (with "
                        "--timing: of timing.json and timing.md) (default: %(default)s)")
    add_run_flags(p)
    p.add_argument("--timing", action="store_true",
                   help="time an epoch of each variant (one seed), eager and compiled, instead "
                        "of training")
    p.add_argument("--timing-steps", type=int, default=50,
                   help="--timing: steps per timed block, and of the warm-up (default: 50)")
    p.add_argument("--timing-rounds", type=int, default=5,
                   help="--timing: interleaved rounds (default: 5)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan's predicted times for these settings and exit")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a worker process: JSON of its configs
    add_options(p, GPUConfig, skip={"variant", "seed", "out"},
                defaults={"compile": "auto: default on CUDA, off on CPU",
                          "bf16": "on for CUDA, off for CPU",
                          "channels_last": "on for CUDA, off for CPU"})
    return p


def main(argv: list[str] | None = None) -> int:
    """The full comparison, ``--timing`` or ``--plan``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    if args.job:
        return _job_main(args.job)
    try:
        variants = split_list(args.variants, str, "--variants")
        seeds = split_list(args.seeds, int, "--seeds")
        configs = [config_from_args(GPUConfig, args, variant=v, seed=s, out=args.out)
                   for v in variants for s in seeds]
        for c in configs:
            check_gpu(c)
        for name in ("timing_steps", "timing_rounds"):
            if getattr(args, name) < 1:
                raise WnormError(f"--{name.replace('_', '-')} must be an integer >= 1; got "
                                 f"{getattr(args, name)}")
    except WnormError as e:
        p.error(str(e))
    command = "python -m experiments.classify_gpu " + " ".join(argv)
    if args.plan:
        print(plan_text(_plan(configs[0], variants, len(seeds))))
        return 0
    try:
        if args.timing:
            return _timing(configs[0], variants, args, command)
        sys.stdout.flush()
        result = run_all(configs, overwrite=args.overwrite, resume=args.resume)
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    base = resolved(configs[0])
    predicted = _plan(base, variants, len(seeds), train=_count(out, configs, "train"),
                      test=_count(out, configs, "test"))
    result |= {"plan": predicted,
               "measured": _measured(configs, predicted, result["processes_at_once"]),
               "command": command, "hardware": hardware(base.device)}
    aside = keep_earlier(out / "harness.json")  # an earlier invocation's record into --out
    if aside is not None:
        print(f"classify_gpu: the earlier {out / 'harness.json'} is kept as {aside}")
    (out / "harness.json").write_text(json.dumps(result, indent=2) + "\n")
    from .report import report

    md, png, text = report([out], out / "report", command=f"python -m experiments.report {out} "
                                                         f"--out {out / 'report'}")
    print(text)
    print(f"classify_gpu: {result['wall_s']:.0f} s in all (plan: {predicted['total_s']:.0f} s); "
          f"wrote {out / 'harness.json'}, {md} and {png}")
    for v, m in result["measured"].items():
        shared = m["planned_epoch_s_shared"]
        print(f"  {v}: {m['epoch_s']:.2f} s per epoch (plan: {m['planned_epoch_s_alone']:.2f} "
              "alone" + (f", {shared:.2f} sharing the GPU" if shared else "") + "), "
              f"{m['step_ms']:.2f} ms per stacked step")
    return 0


#: (training images, test images, channels, side) of each dataset's full sets
_SIZES = {"fashion-mnist": (60000, 10000, 1, 28), "cifar10": (50000, 10000, 3, 32)}


def _plan(cfg: GPUConfig, variants: list[str], seeds: int, train: int | None = None,
          test: int | None = None) -> dict[str, Any]:
    """The plan of these runs: ``seeds`` seeds of each variant, on ``train``/``test`` examples
    (default: the subsets asked for, else the dataset's full sets)."""
    full_train, full_test, channels, side = _SIZES[cfg.dataset]
    return plan(cfg, tuple(variants), PLAN, train=train or cfg.train_subset or full_train,
                test=test or cfg.test_subset or full_test, seeds=seeds, in_channels=channels,
                size=side)


def _count(out: Path, configs: list[GPUConfig], split: str) -> int:
    """How many train/test examples the runs used (from a config.json)."""
    c = configs[0]
    data = json.loads((Path(c.out) / run_dir_name(c) / "config.json").read_text())["data"]
    return int(data[split])


def _timing(cfg: GPUConfig, variants: list[str], args: argparse.Namespace,
            command: str) -> int:
    out = check_out(args.out, "timing.json")
    out.mkdir(parents=True, exist_ok=True)
    r = resolved(cfg)
    machine = hardware(r.device)
    data = _load(cfg)
    kept: list[bool] = []

    def write(t: dict[str, Any]) -> str:
        if not kept:  # at the first write: an earlier measurement is kept, not replaced (and
            kept.append(True)  # is still there if this one fails before it writes)
            for name in ("timing.json", "timing.md"):
                aside = keep_earlier(out / name)
                if aside is not None:
                    print(f"classify_gpu: the earlier {out / name} is kept as {aside}")
        (out / "timing.json").write_text(json.dumps(t | {"hardware": machine, "command": command},
                                                    indent=2) + "\n")
        text = timing_text(t, machine, command)
        (out / "timing.md").write_text(text)
        return text

    modes = ["off"] + ([r.compile] if r.compile != "off" else [])
    if len(modes) > 1:  # eager alone first, written at once: compiling may outlast the call
        write(time_variants(cfg, variants, data, modes=["off"], steps=args.timing_steps,
                            rounds=args.timing_rounds))
        print(f"wrote the eager rows to {out / 'timing.json'}; compiling next")
    text = write(time_variants(cfg, variants, data, modes=modes, steps=args.timing_steps,
                               rounds=args.timing_rounds))
    print(text)
    print(f"wrote {out / 'timing.json'} and {out / 'timing.md'}")
    return 0


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
