"""The quick comparison, what ``make demo`` runs: the paper's five variants, several seeds
each, a small run on 2 CPU cores in about two minutes; then the report, whose curves show the
seeds' spread and whose verdict says which variant reaches a training error first and which
ends with the lowest test error, and whether the gaps are larger than the spread.

Command (from the repository root; the committed output is results/demo)::

    python -m experiments.demo --out results/demo

It is :mod:`experiments.classify_gpu`'s harness with the defaults below (on the CPU, one run
per process per core, no compilation), so its run folders are the same as every other
classification run's and ``python -m experiments.report`` reads them. It replaces the run
folders of an earlier demo under ``--out`` (``--no-overwrite`` refuses instead); a folder
holding run folders that no demo wrote (no ``demo.json``) is refused. Any option of
``classify_gpu`` can be given (``--seeds 0,1,2,3,4``, ``--epochs 10``, ``--device cuda`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from wnorm import WnormError

from .classify_gpu import GPUConfig, run_all
from .common import add_options, check_out, config_from_args, run_folders, split_list
from .report import report
from .stack_trainer import check_gpu

__all__ = ["DEMO", "main"]

# --------------------------------------------------------------------------- defaults
# Sized for about two minutes on 2 CPU cores: 15 runs of about 12 s of CPU time, two at once.
DEMO = {
    "variants": "normal,weightnorm,batchnorm,wn+meanonly,meanonly",
    "seeds": "0,1,2",
    "out": "runs/demo",
    "epochs": 6,
    "width": 0.125,  # 12 / 24 channels instead of 96 / 192
    "train_subset": 2000,
    "test_subset": 1000,
    "init_examples": 500,
    "lr": 0.002,  # a 6-epoch schedule needs a larger step than the paper's 200 epochs
    "beta1_late": 0.9,  # the paper's switch to 0.5 at full lr spiked the loss in short runs
    # no input noise, no dropout: in 6 epochs at 1/8 width the paper's noise and dropout 0.5
    # spread a variant's seeds so far apart in test error that no two variants could be ranked
    "noise": 0.0,
    "dropout": 0.0,
    "device": "cpu",
    "compile": "off",  # compiling takes longer than these runs
    "stack": 1,  # on a CPU, grouped convolutions ran slower than the seeds one by one
    "procs": 2,  # one process per core, one torch thread each
    "threads": 1,
    "eval_batch_size": 500,
}
# ---------------------------------------------------------------------------------------------
#: how an interrupted demo goes on (it has no --resume: it trains its runs anew)
_AGAIN = "run the demo again to train them anew"


def _demo_runs(marker: Path, out: Path) -> frozenset[str] | None:
    """The run folders under ``out`` that a demo wrote, by its ``demo.json`` (one written
    before the list was kept counts every run folder there as the demo's); None without one."""
    if not marker.is_file():
        return None
    try:
        runs = json.loads(marker.read_text()).get("run_folders")
    except (ValueError, AttributeError):
        raise WnormError(f"demo: {marker} is not a demo's record (unreadable); remove it, or "
                         "give the demo another --out") from None
    if runs is None:
        return frozenset(f.name for f in run_folders([out]))
    return frozenset(runs)


def main(argv: list[str] | None = None) -> int:
    """Train the demo's runs and write their report; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m experiments.demo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=DEMO["variants"],
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default=DEMO["seeds"], help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=DEMO["out"], help="folder of the run folders and of "
                                                      "report/ (default: %(default)s)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace the run folders of an earlier demo under --out (default: yes, "
                        "so `make demo` can run again; --no-overwrite refuses instead)")
    fields = {k: v for k, v in DEMO.items() if k not in ("variants", "seeds", "out")}
    add_options(p, GPUConfig, skip={"variant", "seed", "out"}, defaults=fields)
    args = p.parse_args(argv)
    try:
        variants = split_list(args.variants, str, "--variants")
        seeds = split_list(args.seeds, int, "--seeds")
        configs = [config_from_args(GPUConfig, args, fields, variant=v, seed=s, out=args.out)
                   for s in seeds for v in variants]
        for c in configs:
            check_gpu(c)
    except WnormError as e:
        p.error(str(e))
    out = Path(args.out)
    command = "python -m experiments.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    marker = out / "demo.json"
    names = [f"{c.dataset}-{c.variant}-s{c.seed}" for c in configs]
    try:
        check_out(out, "the demo's run folders")
        # replace only what a demo wrote: another experiment's runs (classify's 15-epoch
        # comparison) would be lost to a 1-minute demo under the same folder names, and a
        # folder holding them is not the demo's to mark or to write a report into
        marked = _demo_runs(marker, out)
        ours = marked or frozenset()
        theirs = sorted({f.name for f in run_folders([out])} - ours) if out.is_dir() else []
        if theirs or (marked is None and (out / "report").exists()):
            what = f"run folders that no demo wrote: {', '.join(theirs[:5])}" + (
                "..." if len(theirs) > 5 else "") if theirs else "a report/ no demo wrote"
            raise WnormError(f"demo: {out} holds {what}; give the demo another --out")
        again = [n for n in names if (out / n).exists()]
        if again and args.overwrite:
            print(f"demo: replacing the previous demo runs in {out} ({len(again)} run folders; "
                  "--no-overwrite refuses instead)")
        runs = sorted(ours | set(names))
        if args.overwrite or not again:  # else run_all refuses, and nothing is written
            out.mkdir(parents=True, exist_ok=True)
            # written first: the folder and these run folders are a demo's, even if cut short
            marker.write_text(json.dumps({"command": command, "finished": False,
                                          "run_folders": runs}, indent=2) + "\n")
        run_all(configs, overwrite=args.overwrite)
        train_s = time.perf_counter() - t0
        # this demo's runs only: run folders of an earlier demo with other seeds or variants
        # stay where they are, out of this report
        mine = [out / f"{c.dataset}-{c.variant}-s{c.seed}" for c in configs]
        others = sorted(set(run_folders([out])) - set(mine))
        if others:
            print(f"demo: {len(others)} other run folder(s) in {out} (an earlier demo's) are "
                  f"left out of this report: {', '.join(f.name for f in others)}")
        md, png, text = report(mine, out / "report",
                               command=f"python -m experiments.report "
                                       f"{' '.join(map(str, mine))} --out {out / 'report'}")
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    info = {"command": command, "finished": True, "run_folders": runs,
            "wall_s": time.perf_counter() - t0, "train_wall_s": train_s,
            "cpu_s": sum(u.ru_utime + u.ru_stime for u in used), "runs": len(configs),
            "processes": min(configs[0].procs, len(configs)), "cpus": os.cpu_count(),
            "load_average_1min": [load_before[0], os.getloadavg()[0]]}
    (out / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    print(text)
    print(f"demo: {info['wall_s']:.0f} s ({train_s:.0f} s of training, {len(configs)} runs, "
          f"{info['processes']} at once; {info['cpu_s']:.0f} s of CPU time; the machine's load "
          f"average went from {load_before[0]:.1f} to {info['load_average_1min'][1]:.1f} on "
          f"{info['cpus']} CPUs); wrote {md}, {png} and {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main, again=_AGAIN)
