r"""Learning-rate robustness (Salimans & Kingma 2016, section 2.1): train ``normal``,
``weightnorm`` and ``forced`` over learning rates spanning orders of magnitude, and record
:math:`\lVert v\rVert` as it grows.

The claim. Under plain SGD each weight-norm step is orthogonal to :math:`v`, so
:math:`\lVert v'\rVert = \sqrt{1 + C^2}\,\lVert v\rVert` with :math:`C = \lVert\Delta v\rVert/\lVert v\rVert`:
a too-large learning rate grows :math:`\lVert v\rVert` quickly, which shrinks the effective step
:math:`g/\lVert v\rVert` and stabilizes training. ``forced`` (EDM2) renormalizes :math:`v` every
step, so its :math:`\lVert v\rVert` stays flat and the mechanism is switched off: the contrast.

Commands (from the repository root)::

    # the committed run: about 6 minutes on one CPU core (results/lr-sweep/)
    python -m experiments.lr_sweep --threads 1 --out results/lr-sweep/runs
    python -m experiments.report results/lr-sweep/runs --out results/lr-sweep

    # Adam instead of SGD, the paper's convnet instead of the MLP
    python -m experiments.lr_sweep --optimizer adam --model paper --width 0.125 --out runs/sw

Defaults (:class:`SweepConfig`, :data:`LRS`): a 784-100-100-10 leaky-ReLU MLP on 10,000
Fashion-MNIST training images, batch 100, 15 epochs, plain SGD with momentum 0 (what the
derivation assumes), a constant learning rate, the paper's data-dependent init on 500 examples
for every variant (``normal`` included, as in the authors' code).

A run writes ``<out>/<dataset>-<model>-<variant>-<optimizer>-lr<lr>-s<seed>/`` with
``config.json`` (``"kind": "lr-sweep"``), ``version.json``, ``log.txt``, ``metrics.jsonl`` (one
line per epoch: ``epoch``, ``train_loss`` (mean over the epoch's minibatches; ``null`` once
diverged), ``train_error``, ``test_loss``, ``test_error``, ``seconds``, ``lr``, ``v_norm``,
``diverged``) and ``vnorm.jsonl``: every ``vnorm_every`` steps, for each reparameterized layer
the mean over its output units of :math:`\lVert v\rVert`, as the step's forward used it. A run
whose loss turns NaN or inf stops there; its last line says ``"diverged": true`` and at which step.

``python -m experiments.report <sweep runs> --out DIR`` writes the plots and tables
(:mod:`experiments.report_sweep`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

from .common import (RunFolder, add_options, add_run_flags, batch_that_runs, check_config,
                     config_from_args, no_repeats, pending, progress, split_list)
from .data import ImageData, load
from .nets import MLP, MLP_VARIANTS, VARIANTS, build, initialize, reparameterized_layers

__all__ = ["SweepConfig", "LRS", "SWEEP_VARIANTS", "run_dir_name", "train_one", "sweep",
           "v_norms", "check_all", "main"]

# --------------------------------------------------------------------------- defaults
#: Learning rates of the committed sweep: 1e-4 .. 30, log spaced (5.5 orders of magnitude).
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)
SWEEP_VARIANTS = ("normal", "weightnorm", "forced")
SEEDS = (0, 1)


@dataclass
class SweepConfig:
    """One run of the sweep; the defaults are the committed run's."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "mlp"  # mlp | paper (the section-5 convnet at --width, no noise, no dropout)
    variant: str = "weightnorm"
    lr: float = 0.01
    seed: int = 0
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0  # sgd only
    epochs: int = 15
    hidden: int = 100  # mlp: units per hidden layer
    depth: int = 2  # mlp: hidden layers
    width: float = 0.125  # paper: multiplier on 96/192 channels
    train_subset: int | None = 10000
    test_subset: int | None = 1000
    batch_size: int = 100
    init_examples: int = 500
    init_scale: float = 1.0
    vnorm_every: int = 20  # steps between ||v|| records
    device: str = "cpu"
    threads: int | None = None
    download: bool = True
    out: str = "runs/lr-sweep"
    progress: bool = True  # a progress bar over each epoch's steps (stderr)


# ---------------------------------------------------------------------------------------------


def run_dir_name(cfg: SweepConfig) -> str:
    return f"{cfg.dataset}-{cfg.model}-{cfg.variant}-{cfg.optimizer}-lr{cfg.lr:g}-s{cfg.seed}"


def _check(cfg: SweepConfig) -> None:
    check_config(cfg)
    if cfg.model not in ("mlp", "paper"):
        raise WnormError(f"lr-sweep: --model must be mlp or paper; got {cfg.model!r}")
    allowed = MLP_VARIANTS if cfg.model == "mlp" else VARIANTS
    if cfg.variant not in allowed:
        raise WnormError(f"lr-sweep: variant {cfg.variant!r} is not one of {list(allowed)} "
                         f"(model {cfg.model})")
    if cfg.optimizer not in ("sgd", "adam"):
        raise WnormError(f"lr-sweep: --optimizer must be sgd or adam; got {cfg.optimizer!r}")


# --------------------------------------------------------------------------- one run
def v_norms(layers: dict[str, Tensor]) -> dict[str, float]:
    r"""``{layer: mean over output units of }\lVert v\rVert`` (units along v's first axis)."""
    with torch.no_grad():
        return {name: float(v.flatten(1).double().norm(dim=1).mean())
                for name, v in layers.items()}


def _model(cfg: SweepConfig, data: ImageData) -> nn.Module:
    if cfg.model == "mlp":
        return MLP(cfg.variant, data.x_train[0].numel(), hidden=cfg.hidden, depth=cfg.depth,
                   num_classes=data.num_classes)
    return build(cfg.variant, data.in_channels, cfg.width, noise=0.0, dropout=0.0)


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, wrong = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            logits = model(x[i:i + batch])
            loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
            wrong += float((logits.argmax(1) != y[i:i + batch]).sum())
    model.train()
    n = max(x.shape[0], 1)
    return loss / n, wrong / n


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_one(cfg: SweepConfig, data: ImageData, echo: bool = True, *,
              overwrite: bool = False) -> Path:
    """Train one (variant, lr, seed) at a constant learning rate; returns the run folder.

    Raises:
        WnormError: a bad setting, or the run folder already holds a run and ``overwrite`` is
            False (both before the folder is touched).
    """
    _check(cfg)
    if data.x_train.shape[0] == 0:
        raise WnormError(f"{data.name}: the training set is empty")
    cfg = batch_that_runs(cfg, data.x_train.shape[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    extra = {"kind": "lr-sweep", "data": data.describe()}
    with RunFolder(Path(cfg.out) / run_dir_name(cfg), cfg, device, extra, echo=bool(echo),
                   overwrite=overwrite) as folder:
        _train(cfg, data, device, folder)
    return folder.path


def _train(cfg: SweepConfig, data: ImageData, device: torch.device, folder: RunFolder) -> None:
    log = folder.log
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    n = x.shape[0]
    torch.manual_seed(cfg.seed)
    model = _model(cfg, data).to(device)
    order = torch.Generator().manual_seed(cfg.seed)
    init_idx = torch.randperm(n, generator=order)[: cfg.init_examples]
    log(f"{run_dir_name(cfg)}: {initialize(model, x[init_idx.to(device)], cfg.init_scale)}")
    torch.manual_seed(cfg.seed * 1000 + 1)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr,
                                                     momentum=cfg.momentum)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.variant == "forced":
        wnorm.project_after_step(opt, model)  # forced WN: v back on its sphere after every step
    layers = reparameterized_layers(model)
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    step = 0
    diverged_at: int | None = None
    model.train()
    with (folder.path / "vnorm.jsonl").open("w") as vfile:
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=order).to(device)
            loss_sum, wrong, seen = 0.0, 0.0, 0
            last_v: dict[str, float] = {}
            t0 = time.perf_counter()
            with progress(steps, f"{cfg.variant} lr {cfg.lr:g} s{cfg.seed} "
                                  f"{epoch}/{cfg.epochs}", cfg.progress) as bar:
                for s in range(steps):
                    if bar is not None:
                        bar.update(1)
                    idx = perm[s * batch:(s + 1) * batch]
                    logits = model(x[idx])
                    loss = F.cross_entropy(logits, y[idx])
                    step += 1
                    if layers and (step == 1 or step % cfg.vnorm_every == 0 or s == steps - 1):
                        last_v = v_norms(layers)  # after the forward: the norm it used
                        vfile.write(json.dumps({"step": step, "epoch": epoch, "v_norm": last_v})
                                    + "\n")
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        diverged_at = step
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += value * idx.numel()
                    wrong += float((logits.argmax(1) != y[idx]).sum())
                    seen += idx.numel()
            seconds = time.perf_counter() - t0
            if diverged_at is None:
                te_loss, te_err = _evaluate(model, x_test, y_test)
                row: dict[str, Any] = {
                    "epoch": epoch, "train_loss": loss_sum / seen, "train_error": wrong / seen,
                    "test_loss": _finite_or_none(te_loss), "test_error": te_err,
                }
            else:
                row = {"epoch": epoch, "train_loss": None, "train_error": None,
                       "test_loss": None, "test_error": None}
            mean_v = (sum(last_v.values()) / len(last_v)) if last_v else None
            row |= {"seconds": seconds, "lr": cfg.lr,
                    "v_norm": _finite_or_none(mean_v) if mean_v is not None else None,
                    "diverged": diverged_at is not None}
            if diverged_at is not None:
                row["diverged_step"] = diverged_at
            folder.write(row)
            if diverged_at is not None:
                log(f"epoch {epoch}/{cfg.epochs}: training loss became NaN/inf at step "
                    f"{diverged_at} (lr {cfg.lr:g}): diverged, stopping")
                return
            v_txt = f"  mean ||v|| {mean_v:.4g}" if mean_v is not None else ""
            log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} error "
                f"{100 * row['train_error']:.2f}%  test error {100 * row['test_error']:.2f}%"
                f"{v_txt}  {seconds:.1f}s")


def _configs(base: SweepConfig, variants: list[str], lrs: list[float], seeds: list[int]
             ) -> list[SweepConfig]:
    return [SweepConfig(**(asdict(base) | {"variant": variant, "lr": lr, "seed": seed}))
            for seed in seeds for lr in lrs for variant in variants]


def check_all(base: SweepConfig, variants: list[str], lrs: list[float], seeds: list[int], *,
              overwrite: bool = False, resume: bool = False) -> list[SweepConfig]:
    """Every run's settings, and that no run folder already holds a run (unless
    ``overwrite``; with ``resume``, finished runs of the same setting are kept): before any
    data is loaded or any run trains. Returns the configs left to train, seed-major.

    Raises:
        WnormError: the first problem, naming the option or the folder.
    """
    if not (variants and lrs and seeds):
        raise WnormError("lr-sweep: --variants, --lrs and --seeds each need at least one value")
    for values, option in ((variants, "--variants"), (lrs, "--lrs"), (seeds, "--seeds")):
        no_repeats(list(values), option)
    configs = _configs(base, variants, lrs, seeds)
    for cfg in configs:
        _check(cfg)
    # learning rates that print alike (0.01 and 0.0100000001) would share a run folder: one
    # run would replace the other, or the sweep stop after training the first
    first: dict[str, float] = {}
    for c in configs:
        other = first.setdefault(run_dir_name(c), c.lr)
        if other != c.lr:
            raise WnormError(f"lr-sweep: --lrs {other!r} and {c.lr!r} would share the run folder "
                             f"{run_dir_name(c)}; give learning rates that differ in their "
                             "first 6 significant digits")
    return pending(configs, lambda c: Path(c.out) / run_dir_name(c), overwrite=overwrite,
                   resume=resume)


def sweep(base: SweepConfig, variants: list[str], lrs: list[float], seeds: list[int],
          data: ImageData, echo: bool = True, *, overwrite: bool = False,
          resume: bool = False) -> list[Path]:
    """Every (seed, lr, variant), seed-major so that an interrupted sweep has whole seeds
    (with ``resume``, those not finished already); returns the run folders trained.

    ``echo`` prints the log lines. Every setting and run folder is checked before the first
    run trains.
    """
    todo = check_all(base, variants, lrs, seeds, overwrite=overwrite, resume=resume)
    return [train_one(cfg, data, echo=echo, overwrite=overwrite or resume) for cfg in todo]


# --------------------------------------------------------------------------- command line
_NOT_OPTIONS = {"variant", "seed", "out", "lr"}


def main(argv: list[str] | None = None) -> int:
    """Train variants x learning rates x seeds; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m experiments.lr_sweep",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(SWEEP_VARIANTS),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS),
                   help="comma-separated learning rates (default: %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=SweepConfig.out, help="parent folder of the run folders "
                                                          "(default: %(default)s)")
    add_run_flags(p)
    add_options(p, SweepConfig, skip=_NOT_OPTIONS)
    args = p.parse_args(argv)
    try:
        variants = split_list(args.variants, str, "--variants")
        lrs = split_list(args.lrs, float, "--lrs")
        seeds = split_list(args.seeds, int, "--seeds")
        bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
        if bad:
            raise WnormError(f"--lrs: learning rates must be finite and > 0; got {bad}")
        base = config_from_args(SweepConfig, args, out=args.out)
        for cfg in _configs(base, variants, lrs, seeds):
            _check(cfg)
    except WnormError as e:
        p.error(str(e))
    try:
        todo = check_all(base, variants, lrs, seeds, overwrite=args.overwrite,
                         resume=args.resume)
        # the data is loaded only for runs left to train
        data = load(base.dataset, base.data_dir, train_subset=base.train_subset,
                    test_subset=base.test_subset, zca=False,
                    download=base.download) if todo else None
        t0 = time.perf_counter()
        folders = [train_one(cfg, data, overwrite=args.overwrite or args.resume)
                   for cfg in todo]
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"lr-sweep: {len(folders)} runs in {time.perf_counter() - t0:.0f} s under {args.out}")
    return 0


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
