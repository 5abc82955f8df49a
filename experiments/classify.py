r"""The paper's classification experiment (section 5): variants x seeds, one run folder each.

Commands (from the repository root; ``python -m experiments.report`` makes the table and plot)::

    # the committed CPU comparison (results/classify-fashion-cpu): 5 variants x 3 seeds, the
    # network at 1/8 width, 20,000 training images, 15 epochs; about 30 s per epoch per run
    # on one core
    python -m experiments.classify --variants normal,weightnorm,batchnorm,wn+meanonly,meanonly \
        --seeds 0,1,2 --epochs 15 --width 0.125 --train-subset 20000 --threads 1 \
        --out results/classify-fashion-cpu
    python -m experiments.report results/classify-fashion-cpu \
        --out results/classify-fashion-cpu/report

    # weight norm's relatives beside the paper's variants (results/family-demo)
    python -m experiments.classify --variants normal,weightnorm,centered,ws+gn,forced,balanced,arpit \
        --seeds 0 --epochs 8 --width 0.125 --train-subset 3000 --test-subset 1000 --lr 0.002 \
        --beta1-late 0.9 --threads 1 --no-progress --out results/family-demo/runs

    # CIFAR-10 (ZCA on by default), and the same under DDP: each rank trains on its share of
    # every batch of 100
    python -m experiments.classify --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \
        --variants normal,weightnorm,batchnorm,wn+meanonly --epochs 200 --device cuda --out runs/c
    torchrun --nproc-per-node 4 -m experiments.classify --dataset cifar10 --data-dir ... \
        --device cuda --out runs/c

This is the plain eager harness, for any device. On a GPU, :mod:`experiments.classify_gpu`
runs the same network, data, optimizer and schedule several seeds at a time, compiled.

Optimizer and schedule (the authors' CIFAR-10 script, with its 200 epochs as ``epochs``): Adam
with :math:`\beta_2 = 0.999`, :math:`\epsilon = 10^{-8}`, batch 100; for epoch
:math:`e = 0, 1, \dots` and :math:`h` = ``decay_start`` (default ``epochs / 2``, a float as in
the authors' ``lr * min(2 - epoch / (0.5 * n_epochs), 1)``, so the last epoch never runs at lr 0)

.. math::
    \text{lr}_e = \text{lr}\cdot\min(2 - e/h,\ 1),\qquad
    \beta_{1,e} = 0.9 \text{ if } e < h \text{ else } 0.5 .

A run writes ``<out>/<dataset>-<variant>-s<seed>/`` (:mod:`experiments.common`):
``config.json`` (the resolved :class:`Config`, the data actually used, the precision);
``version.json``; ``log.txt``; ``metrics.jsonl``, one line per epoch: ``epoch`` (1-based),
``train_loss``, ``train_error`` (fractions in [0, 1], measured on the training batches in
training mode, noise and dropout on, as in the paper's Figure 1), ``test_loss``, ``test_error``
(eval mode: running means, no noise), ``seconds`` (wall time of the epoch's training steps),
``eval_seconds``, ``lr``, ``beta1``; a run whose training loss turned NaN/inf ends with
``{"epoch": e, "diverged": true, "loss": "nan", ...}`` (its numbers null) and stops there.

Under ``torchrun`` (``WORLD_SIZE`` set) every rank builds the same model, runs the data init on
its share of the init examples (:func:`wnorm.data_init` all-reduces the statistics), then trains
under DistributedDataParallel on its share of each batch, with the batch norms' means (and
variances) taken over the whole batch (:class:`wnorm.SyncMeanOnlyBatchNorm`; ``nn.SyncBatchNorm``
on GPUs only); rank 0 writes the folder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

from .common import (RunFolder, RunLog, add_options, add_run_flags, batch_that_runs,
                     check_config, cli_main, config_from_args, pending, precision_info, progress,
                     read_jsonl, refuse_existing, split_list)
from .data import DATASETS, ImageData, load
from .nets import VARIANTS, build, initialize

__all__ = ["BATCH_STATISTICS", "Config", "Dist", "check", "run", "run_dir_name", "schedule",
           "main"]


# --------------------------------------------------------------------------- defaults
@dataclass
class Config:
    """Everything a run depends on; the defaults are the paper's (section 5)."""

    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10
    data_dir: str | None = None  # default: the system dir / cache (fashion-mnist)
    variant: str = "weightnorm"  # normal | weightnorm | batchnorm | wn+meanonly | meanonly | ...
    seed: int = 0
    epochs: int = 200
    width: float = 1.0  # multiplier on the 96/192 channels
    train_subset: int | None = None  # None: the full training set
    test_subset: int | None = None  # None: the full test set
    zca: bool | None = None  # None: on for cifar10, off for fashion-mnist
    batch_size: int = 100
    lr: float = 0.001
    beta1: float = 0.9
    beta1_late: float = 0.5  # beta1 from decay_start on
    beta2: float = 0.999
    eps: float = 1e-8
    decay_start: float | None = None  # None: epochs / 2 (the authors' 0.5 * n_epochs)
    init_examples: int = 500  # data-dependent init batch
    init_scale: float = 1.0
    noise: float = 0.15
    dropout: float = 0.5
    eval_batch_size: int = 500
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: torch's default)
    out: str = "runs"
    progress: bool = True
    download: bool = True  # fashion-mnist: download when not found locally

    def resolved(self) -> Config:
        """A copy with ``None``/``auto`` defaults made explicit."""
        c = type(self)(**asdict(self))
        if c.decay_start is None:
            c.decay_start = c.epochs / 2
        if c.zca is None:
            c.zca = c.dataset == "cifar10"
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        return c

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------------------------


def run_dir_name(cfg: Config) -> str:
    return f"{cfg.dataset}-{cfg.variant}-s{cfg.seed}"


def schedule(cfg: Config, epoch: int) -> tuple[float, float]:
    """``(lr, beta1)`` for 0-based ``epoch``: constant, then linear to 0 from ``decay_start``.

    Example:
        >>> [round(schedule(Config(epochs=4, lr=1.0), e)[0], 2) for e in range(4)]
        [1.0, 1.0, 1.0, 0.5]
    """
    h = cfg.epochs / 2 if cfg.decay_start is None else cfg.decay_start
    if h <= 0:
        return cfg.lr * max(0.0, 1.0 - epoch / max(cfg.epochs, 1)), cfg.beta1_late
    return cfg.lr * min(2.0 - epoch / h, 1.0), (cfg.beta1 if epoch < h else cfg.beta1_late)


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """Where this process stands: ``rank`` of ``world`` (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str) -> Dist:
        """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local)

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def main_choice(self, chosen: list[Config], among: list[Config]) -> list[Config]:
        """Rank 0's ``chosen`` (a sublist of ``among``, which every rank holds) on every rank."""
        if self.world == 1:
            return chosen
        import torch.distributed as dist

        picked = [[among.index(c) for c in chosen] if self.main else None]
        dist.broadcast_object_list(picked, src=0)
        return [among[i] for i in picked[0]]


# --------------------------------------------------------------------------- training
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int, dist: Dist,
              device: torch.device) -> tuple[float, float]:
    """Mean loss and error on ``x, y`` in eval mode (each rank takes every world-th example)."""
    model.eval()
    loss_sum, wrong, count = 0.0, 0.0, 0.0
    xs, ys = x[dist.rank::dist.world], y[dist.rank::dist.world]
    with torch.no_grad():
        for i in range(0, xs.shape[0], batch):
            xb, yb = xs[i:i + batch].to(device), ys[i:i + batch].to(device)
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            wrong += float((logits.argmax(1) != yb).sum())
            count += yb.shape[0]
    loss_sum, wrong, count = dist.all_sum([loss_sum, wrong, count], device)
    return loss_sum / max(count, 1), wrong / max(count, 1)


def check(cfg: Config) -> None:
    """Refuse bad settings before any data is loaded or any folder touched.

    Raises:
        WnormError: ``--option must be ...; got value`` (see :mod:`experiments.common`).
    """
    check_config(cfg)
    if cfg.dataset not in DATASETS:
        raise WnormError(f"--dataset must be one of {list(DATASETS)}; got {cfg.dataset!r}")
    if cfg.variant not in VARIANTS:
        raise WnormError(f"--variants: unknown {cfg.variant!r}; expected some of {list(VARIANTS)}")
    _check_batch(cfg)


#: the variants whose layers take batch statistics: a batch of one example has none
BATCH_STATISTICS = ("batchnorm", "wn+meanonly", "meanonly")


def _check_batch(cfg: Config) -> None:
    """Refuse a batch of one example (as asked, or clamped to ``--train-subset``) for a
    variant in :data:`BATCH_STATISTICS`, before any run trains."""
    batch = min(cfg.batch_size, cfg.train_subset or cfg.batch_size)
    if cfg.variant in BATCH_STATISTICS and batch < 2:
        why = "" if batch == cfg.batch_size else \
            f" (a batch is at most the training set: --train-subset {cfg.train_subset})"
        raise WnormError(f"--batch-size must be >= 2 for {cfg.variant}, whose batch "
                         f"statistics need 2 or more examples; got {batch}{why}")


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run(cfg: Config, data: ImageData, dist: Dist | None = None, *,
        overwrite: bool = False) -> Path:
    """Train ``cfg.variant`` on ``data`` for ``cfg.epochs``; returns the run folder.

    A training loss that turns NaN/inf stops the run: its last ``metrics.jsonl`` line is
    ``{"epoch": e, "diverged": true, ...}`` and ``log.txt`` says so; no exception.

    Raises:
        WnormError: bad settings (batch size not divisible by the number of processes,
            an empty training set, an unknown variant, a value out of range), or the run folder
            already holds a run and ``overwrite`` is False; all before the folder is touched.
    """
    check(cfg)
    cfg = cfg.resolved()
    dist = dist or Dist()
    if cfg.batch_size % dist.world:
        raise WnormError(f"batch_size {cfg.batch_size} must be divisible by the number of "
                         f"processes {dist.world}")
    # the batch and the init batch at most the training set, recorded as they ran; the
    # batch is split across the processes as it comes
    cfg = batch_that_runs(cfg, data.x_train.shape[0])
    if data.x_train.shape[0] == 0:
        raise WnormError(f"{data.name}: the training set is empty")
    _check_batch(cfg)  # a training set of one example
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" and dist.world > 1
                          else cfg.device)
    folder = Path(cfg.out) / run_dir_name(cfg)
    refuse_existing([folder], overwrite)
    torch.manual_seed(cfg.seed)  # the same model on every rank; built before the folder is touched
    model = build(cfg.variant, data.in_channels, cfg.width, noise=cfg.noise,
                  dropout=cfg.dropout).to(device)
    if not dist.main:
        _train(cfg, data, dist, device, None, RunLog(None, echo=None), model)
        return folder
    extra = {"data": data.describe(), "world_size": dist.world,
             "precision": precision_info(device)}
    with RunFolder(folder, cfg, device, extra, overwrite=True, world=dist.world) as rf:
        _train(cfg, data, dist, device, rf, rf.log, model)
    return folder


def _train(cfg: Config, data: ImageData, dist: Dist, device: torch.device,
           folder: RunFolder | None, log: RunLog, model: nn.Module) -> None:
    n = data.x_train.shape[0]
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    log(f"{run_dir_name(cfg)}: {data.name} {n} train / {data.x_test.shape[0]} test, "
        f"width {cfg.width}, {cfg.epochs} epochs, device {device} x{dist.world}")

    order = torch.Generator().manual_seed(cfg.seed)  # the same data order on every rank
    init_idx = torch.randperm(n, generator=order)[: cfg.init_examples][dist.rank::dist.world]
    msg = initialize(model, x_train[init_idx.to(device)], cfg.init_scale)
    log(msg + (f" on each of {dist.world} ranks (statistics all-reduced)" if dist.world > 1
               and "data init" in msg else ""))
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    torch.manual_seed(cfg.seed * 1000 + dist.rank + 1)  # noise and dropout differ per rank
    net: nn.Module = model
    if dist.world > 1:
        # batch statistics of the paper's minibatch, not of each rank's share of it
        wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(model)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            if device.type == "cuda":
                nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log("batch norm statistics are per rank: nn.SyncBatchNorm needs a GPU")
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.eps)
    if cfg.variant == "forced":
        wnorm.project_after_step(opt, net)  # forced WN: v back on its sphere after every step

    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)  # the authors' script drops the last partial batch
    for epoch in range(cfg.epochs):
        lr, beta1 = schedule(cfg, epoch)
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (beta1, cfg.beta2)
        perm = torch.randperm(n, generator=order).to(device)
        net.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        wrong = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        desc = f"{cfg.variant} s{cfg.seed} {epoch + 1}/{cfg.epochs}"
        broken: str | None = None  # the weights turned NaN/inf (wnorm refuses them)
        try:
            with progress(steps, desc, cfg.progress and dist.main) as bar:
                for s in range(steps):
                    idx = perm[s * batch:(s + 1) * batch][dist.rank::dist.world]
                    xb, yb = x_train[idx], y_train[idx]
                    logits = net(xb)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        loss_sum += loss.detach().double() * yb.shape[0]
                        wrong += (logits.argmax(1) != yb).sum()
                    seen += yb.shape[0]
                    if bar is not None:
                        bar.update(1)
                        if s % 10 == 0 or s == steps - 1:  # a host sync: the bar is for CPUs
                            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                            err=f"{float(wrong) / seen:.3f}")
        except WnormError:
            if _finite(model):
                raise
            broken = "non-finite weights"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        tr_loss, tr_wrong, tr_seen = dist.all_sum([float(loss_sum), float(wrong), float(seen)],
                                                  device)
        t1 = time.perf_counter()
        if broken is None and math.isfinite(tr_loss):
            try:
                te_loss, te_err = _evaluate(model, data.x_test, data.y_test,
                                            cfg.eval_batch_size, dist, device)
            except WnormError:
                if _finite(model):
                    raise
                broken = "non-finite weights"
        if broken is not None or not math.isfinite(tr_loss):
            if folder is not None:
                folder.write({"epoch": epoch + 1, "diverged": True, "loss": broken or str(tr_loss),
                              "train_loss": None, "train_error": None, "test_loss": None,
                              "test_error": None, "seconds": seconds, "eval_seconds": 0.0,
                              "lr": lr, "beta1": beta1})
            log(f"epoch {epoch + 1}/{cfg.epochs}: "
                + (f"training loss became {tr_loss}" if broken is None else broken)
                + f" (lr {lr:g}): diverged, stopping this run (a lower --lr may help)")
            return
        row = {"epoch": epoch + 1, "train_loss": tr_loss / tr_seen,
               "train_error": tr_wrong / tr_seen, "test_loss": te_loss, "test_error": te_err,
               "seconds": seconds, "eval_seconds": time.perf_counter() - t1, "lr": lr,
               "beta1": beta1}
        if folder is not None:
            folder.write(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
            f"error {100 * row['train_error']:.2f}%  test loss {te_loss:.4f} "
            f"error {100 * te_err:.2f}%  {seconds:.1f}s")


# --------------------------------------------------------------------------- command line
_NOT_OPTIONS = {"variant", "seed", "out"}  # --variants, --seeds and --out instead


def parser(prog: str = "python -m experiments.classify", doc: str | None = None,
           defaults: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """``--variants --seeds --out --overwrite --resume`` and one option per :class:`Config`
    field."""
    d = {"variants": "normal,weightnorm,batchnorm,wn+meanonly", "seeds": "0", "out": "runs"}
    d |= {k: v for k, v in (defaults or {}).items() if k in d}
    p = argparse.ArgumentParser(prog=prog, description=(doc or __doc__).split("\n")[0])
    p.add_argument("--variants", default=d["variants"],
                   help=f"comma-separated, some of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--seeds", default=d["seeds"], help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=d["out"], help="parent folder of the run folders "
                                                   "(default: %(default)s)")
    add_run_flags(p)
    add_options(p, Config, skip=_NOT_OPTIONS, defaults=defaults)
    return p


def configs_from(args: argparse.Namespace, config_cls: type = Config,
                 defaults: dict[str, object] | None = None) -> list[Config]:
    """One config per (seed, variant) asked for, each checked.

    Raises:
        WnormError: a bad option, named (the caller hands it to ``parser.error``).
    """
    variants = split_list(args.variants, str, "--variants")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise WnormError(f"--variants: unknown {bad}; expected some of {list(VARIANTS)}")
    seeds = split_list(args.seeds, int, "--seeds")
    configs = [config_from_args(config_cls, args, defaults, variant=v, seed=s, out=args.out)
               for s in seeds for v in variants]
    for cfg in configs:
        check(cfg)
    return configs


def train_all(configs: list[Config], overwrite: bool, resume: bool = False) -> list[Path]:
    """Load the data once and train every config (with ``resume``, those whose run folder
    holds no finished run: :func:`~experiments.common.pending`); returns the run folders
    trained (rank 0's).

    Raises:
        WnormError: a run folder already holds a run, or a finished one another setting (before
            any data is loaded), or the data cannot be loaded.
    """
    among = configs
    configs = pending(configs, lambda c: Path(c.out) / run_dir_name(c), overwrite=overwrite,
                      resume=resume)
    if not configs and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    overwrite = overwrite or resume  # an unfinished folder left to train is trained again
    dist = Dist.setup(among[0].resolved().device)
    # rank 0's run folders decide what is left: on nodes without a shared file system the
    # others see none, and would train other runs in the same collectives, their gradients
    # averaged with rank 0's
    configs = dist.main_choice(configs, among)
    folders = []
    if configs:
        base = configs[0]
        data = load(base.dataset, base.data_dir, train_subset=base.train_subset,
                    test_subset=base.test_subset, zca=base.zca, download=base.download)
        folders = [run(cfg, data, dist, overwrite=overwrite) for cfg in configs]
    if dist.world > 1:
        import gc

        import torch.distributed as td

        # the DDP wrappers (kept alive by reference cycles) freed while the group lives, and
        # every rank past its last collective: without both, a gloo run aborted at exit in
        # about 1 of 10 runs ('terminate called without an active exception'), failing torchrun
        gc.collect()
        td.barrier()
        td.destroy_process_group()
    if not dist.main or not folders:
        return []
    print(f"run folders: {', '.join(map(str, folders))}")
    diverged = [f for f in folders if (rows := read_jsonl(f / "metrics.jsonl"))
                and rows[-1].get("diverged")]
    if diverged:
        print(f"diverged (NaN/inf training loss; see their log.txt): "
              f"{', '.join(map(str, diverged))}", file=sys.stderr)
    return folders


def main(argv: list[str] | None = None) -> int:
    """Train variants x seeds; returns the exit status (2: bad option or data)."""
    return cli_main(parser(), argv, configs_from,
                    lambda configs, args: train_all(configs, args.overwrite, args.resume))


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
