"""The paper's classification experiment (Salimans & Kingma 2016, section 5), one command each.

Commands::

    # the quick version (a few minutes on 2 CPU cores): all five variants, one seed, then the
    # table and the plot; what `make demo` runs
    python -m wnorm.repro demo

    # a full comparison: variants x seeds, one run folder each under --out
    python -m wnorm.repro classify --dataset fashion-mnist \\
        --variants normal,weightnorm,batchnorm,wn+meanonly,meanonly --seeds 0,1,2 \\
        --epochs 20 --width 0.5 --out runs/fashion
    python -m wnorm.repro classify --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \\
        --variants normal,weightnorm,batchnorm,wn+meanonly --seeds 0 --epochs 200 --device cuda \\
        --out runs/cifar10
    torchrun --nproc-per-node 4 -m wnorm.repro classify --dataset cifar10 --data-dir ... \\
        --device cuda --out runs/cifar10       # DDP: each rank trains on its share of a batch

    # weight norm's relatives beside the paper's variants (results/family-demo/)
    python -m wnorm.repro classify --variants normal,weightnorm,centered,ws+gn,forced,arpit \
        --seeds 0 --epochs 8 --width 0.125 --train-subset 3000 --test-subset 1000 --lr 0.002 \
        --beta1-late 0.9 --threads 1 --no-progress --out results/family-demo/runs

    # learning-rate robustness (PAPER.md section 2; wnorm.repro.sweep): normal, weightnorm and
    # forced x 12 learning rates x 2 seeds, plain SGD; about 6 minutes on one CPU core
    python -m wnorm.repro lr-sweep --threads 1 --out results/lr-sweep/runs

    # tables and plots from run folders (never typed by hand); lr-sweep folders get their own
    python -m wnorm.repro report runs/fashion --out results/fashion
    python -m wnorm.repro report results/lr-sweep/runs --out results/lr-sweep

    # the paper's other experiments (section 6), normal vs weight norm, then their report
    python -m wnorm.repro vae --seeds 0,1,2 --out runs/vae
    python -m wnorm.repro seq --seeds 0,1,2 --out runs/seq
    python -m wnorm.repro dqn --envs CartPole-v1,Acrobot-v1 --seeds 0,1,2,3,4 --out runs/dqn
    python -m wnorm.repro others-report runs/vae runs/seq runs/dqn --out runs/others-report

``classify`` takes every field of :class:`wnorm.repro.train.Config` as ``--field-name``
(``--lr``, ``--batch-size``, ``--init-examples``, ``--decay-start``, ``--no-zca``, ...); the
paper's values are the defaults. ``demo`` takes the same options, over the defaults below.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from wnorm import WnormError

# ----------------------------------------------------------------------------- demo defaults
# Sized for <= 5 minutes on 2 shared CPU cores (about 30 s of training per variant).
DEMO = {
    "dataset": "fashion-mnist",
    "variants": "normal,weightnorm,batchnorm,wn+meanonly,meanonly",
    "seeds": "0",
    "epochs": 8,
    "width": 0.125,  # 12 / 24 channels instead of 96 / 192
    "train_subset": 3000,
    "test_subset": 1000,
    "init_examples": 500,
    "lr": 0.002,  # an 8-epoch schedule needs a larger step than the paper's 200 epochs
    "beta1_late": 0.9,  # the paper's switch to 0.5 at full lr spiked the loss in short runs
    "threads": 1,  # 2 threads on 2 shared cores ran 10x slower than 1 here
    "out": "runs/demo",
}
# ---------------------------------------------------------------------------------------------

_SKIP = {"variant", "seed", "out"}
_OTHERS = ("vae", "seq", "dqn")
_SWEEP_SKIP = {"variant", "seed", "out", "lr"}


def _parse_type(annotation: str):  # noqa: ANN202 - returns an argparse type callable or None
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def _add_config_options(p: argparse.ArgumentParser, defaults: dict[str, object],
                        config: type | None = None, skip: set[str] = _SKIP) -> None:
    from .train import Config

    for f in dataclasses.fields(config or Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        kind = _parse_type(str(f.type))
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"(default: {default})")
        else:
            p.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def _split(text: str, kind: type, option: str) -> list:
    """A comma-separated option as a list (spaces around items ignored; no item twice), parsed
    as every subcommand parses them."""
    from .others_report import split_list

    return split_list(text, kind, option)


def _classify(args: argparse.Namespace) -> list[Path]:
    from .checks import refuse_existing
    from .datasets import load
    from .models import VARIANTS
    from .train import Config, Dist, check, run, run_dir_name

    variants = _split(args.variants, str, "--variants")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise WnormError(f"--variants: unknown {bad}; expected some of {list(VARIANTS)}")
    seeds = _split(args.seeds, int, "--seeds")
    base = {k: getattr(args, k) for k in Config.field_names() if k not in _SKIP}
    base["out"] = args.out
    configs = [Config(**base, variant=variant, seed=seed) for seed in seeds for variant in variants]
    for cfg in configs:  # every setting and folder checked before data is loaded or one run trains
        check(cfg)
    targets = [Path(args.out) / run_dir_name(c) for c in configs]
    if args.overwrite and args.command == "demo":
        again = [f for f in targets if (f / "metrics.jsonl").is_file()]
        if again:
            print(f"demo: replacing the previous demo runs in {args.out} ({len(again)} run "
                  "folders; --no-overwrite refuses instead)")
    refuse_existing(targets, args.overwrite)
    dist = Dist.setup(configs[0].resolved().device)
    data = load(base["dataset"], base["data_dir"], train_subset=base["train_subset"],
                test_subset=base["test_subset"], zca=base["zca"], download=base["download"])
    folders = [run(cfg, data, dist, overwrite=args.overwrite) for cfg in configs]
    if dist.world > 1:
        import torch.distributed as td

        td.destroy_process_group()
    if dist.main:
        print(f"run folders: {', '.join(map(str, folders))}")
        from .report import read_jsonl

        diverged = [f for f in folders if (rows := read_jsonl(f / "metrics.jsonl"))
                    and rows[-1].get("diverged")]
        if diverged:
            print(f"diverged (NaN/inf training loss; see their log.txt): "
                  f"{', '.join(map(str, diverged))}", file=sys.stderr)
    return folders if dist.main else []


def _lr_sweep(args: argparse.Namespace) -> list[Path]:
    from .datasets import load
    from .sweep import SweepConfig, check_all, sweep

    variants, lrs, seeds = (_split(args.variants, str, "--variants"),
                            _split(args.lrs, float, "--lrs"), _split(args.seeds, int, "--seeds"))
    base = SweepConfig(**{k: getattr(args, k) for k in SweepConfig.field_names()
                          if k not in _SWEEP_SKIP}, out=args.out)
    check_all(base, variants, lrs, seeds, overwrite=args.overwrite)
    data = load(base.dataset, base.data_dir, train_subset=base.train_subset,
                test_subset=base.test_subset, zca=False, download=base.download)
    t0 = time.perf_counter()
    folders = sweep(base, variants, lrs, seeds, data, progress=args.progress,
                    overwrite=args.overwrite)
    print(f"lr-sweep: {len(folders)} runs in {time.perf_counter() - t0:.0f} s under {args.out}")
    return folders


def _report(paths: list[str], out: str, target: float | None, command: str,
            tolerance: float = 0.1) -> str:
    from .report import is_sweep, report

    if target is not None and not 0 < target < 100:
        raise WnormError(f"--target-error must be a percentage in (0, 100); got {target}")
    if not tolerance >= 0 or not math.isfinite(tolerance):
        raise WnormError(f"--tolerance must be a finite number >= 0; got {tolerance}")
    if is_sweep(paths):
        from .sweep import report_sweep

        md, pngs, text = report_sweep(paths, out, tolerance=tolerance, command=command)
    else:
        md, png, text = report(paths, out, target_error=target, command=command)
        pngs = [png]
    print(text)
    print(f"wrote {md} and {', '.join(map(str, pngs))}")
    return text


def _sweep_lrs() -> tuple[float, ...]:
    from .sweep import LRS

    return LRS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wnorm.repro", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="train variants x seeds, one run folder each")
    c.add_argument("--variants", default="normal,weightnorm,batchnorm,wn+meanonly",
                   help="comma-separated (default: the paper's four)")
    c.add_argument("--seeds", default="0", help="comma-separated (default: 0)")
    c.add_argument("--out", default="runs", help="parent folder of the run folders")
    c.add_argument("--overwrite", action="store_true",
                   help="replace run folders that already hold a run (default: refuse them)")
    _add_config_options(c, {})

    r = sub.add_parser("report", help="run folders -> report.md + training_error.png")
    r.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    r.add_argument("--out", required=True, help="folder for report.md and training_error.png")
    r.add_argument("--target-error", type=float, default=None,
                   help="X for the 'epochs to X%% training error' column (default: the lowest "
                        "training error every variant reaches)")
    r.add_argument("--tolerance", type=float, default=0.1,
                   help="lr-sweep runs: a learning rate counts as good when its final training "
                        "loss is within this of the variant's best (default: 0.1 nats)")

    s = sub.add_parser("lr-sweep", help="variants x learning rates x seeds at a constant lr, "
                                        "recording ||v|| (PAPER.md section 2)")
    s.add_argument("--variants", default="normal,weightnorm,forced",
                   help="comma-separated (default: normal,weightnorm,forced)")
    s.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in _sweep_lrs()),
                   help="comma-separated learning rates (default: %(default)s)")
    s.add_argument("--seeds", default="0,1", help="comma-separated (default: 0,1)")
    s.add_argument("--out", default="runs/lr-sweep", help="parent folder of the run folders")
    s.add_argument("--overwrite", action="store_true",
                   help="replace run folders that already hold a run (default: refuse them)")
    from .sweep import SweepConfig

    _add_config_options(s, {}, SweepConfig, _SWEEP_SKIP)

    import importlib

    for name in _OTHERS:  # the paper's other experiments (section 6), one module each
        mod = importlib.import_module(f"wnorm.repro.{name}")
        mod.add_arguments(sub.add_parser(name, help=(mod.__doc__ or name).strip().split("\n")[0]))
    o = sub.add_parser("others-report", help="vae/seq/dqn run folders -> report.md + PNGs")
    o.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    o.add_argument("--out", required=True, help="folder for report.md and the PNGs")

    d = sub.add_parser("demo", help="the quick version: train, then print the table")
    d.add_argument("--variants", default=DEMO["variants"])
    d.add_argument("--seeds", default=DEMO["seeds"])
    d.add_argument("--out", default=DEMO["out"])
    d.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace the run folders of an earlier demo under --out (default: yes, "
                        "so `make demo` can run again; --no-overwrite refuses instead)")
    _add_config_options(d, DEMO)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m wnorm.repro`` and ``wnorm repro``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            _report(args.runs, args.out, args.target_error,
                    "python -m wnorm.repro " + " ".join(argv), args.tolerance)
        elif args.command == "lr-sweep":
            _lr_sweep(args)
        elif args.command in _OTHERS:
            import importlib

            return importlib.import_module(f"wnorm.repro.{args.command}").run(args)
        elif args.command == "others-report":
            from .others_report import report as others_report

            print(others_report([Path(r) for r in args.runs], Path(args.out),
                                command="python -m wnorm.repro " + " ".join(argv)))
        else:
            t0 = time.perf_counter()
            folders = _classify(args)
            if folders and args.command == "demo":
                out = Path(args.out)
                _report([str(f) for f in folders], str(out / "report"), None,
                         f"python -m wnorm.repro report {' '.join(map(str, folders))} "
                         f"--out {out / 'report'}")
                print(f"demo: {time.perf_counter() - t0:.0f} s in all")
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
