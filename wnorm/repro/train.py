r"""One training run of the section-5 classifier, written to a run folder.

Optimizer and schedule (the authors' CIFAR-10 script, with its 200 epochs as ``epochs``): Adam
with :math:`\beta_2 = 0.999`, :math:`\epsilon = 10^{-8}`, batch 100; for epoch
:math:`e = 0, 1, \dots` and :math:`h` = ``decay_start`` (default ``epochs / 2``, a float as in
the authors' ``lr * min(2 - epoch / (0.5 * n_epochs), 1)``, so the last epoch never runs at lr 0)

.. math::
    \text{lr}_e = \text{lr}\cdot\min(2 - e/h,\ 1),\qquad
    \beta_{1,e} = 0.9 \text{ if } e < h \text{ else } 0.5 .

A run writes ``<out>/<dataset>-<variant>-s<seed>/``:

- ``config.json``   the resolved :class:`Config` plus the data actually used
- ``version.json``  git commit (and whether the tree was dirty), wnorm, torch, python, hardware
- ``metrics.jsonl`` one line per epoch: ``epoch`` (1-based), ``train_loss``, ``train_error``
  (fractions in [0, 1], measured on the training batches in training mode, noise and dropout
  on, as in the paper's Figure 1), ``test_loss``, ``test_error`` (eval mode: running means, no
  noise), ``seconds`` (wall time of the epoch's training steps), ``eval_seconds``, ``lr``,
  ``beta1``; a run whose training loss turned NaN/inf ends with ``{"epoch": e, "diverged":
  true, "loss": "nan", ...}`` (its numbers null) and stops there
- ``log.txt``       what was printed

Multi-GPU: launched under ``torchrun`` (``WORLD_SIZE`` set), every rank builds the same model,
runs :func:`wnorm.data_init` on its share of the init examples (the statistics are all-reduced),
then trains under DistributedDataParallel on its share of each batch of ``batch_size``; rank 0
writes the folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm import WnormError
from wnorm.sphere import project_after_step

from .datasets import ImageData
from .models import build, initialize

__all__ = ["Config", "Dist", "check", "run", "run_dir_name", "schedule", "version_info"]


# --------------------------------------------------------------------------- defaults
@dataclass
class Config:
    """Everything a run depends on; the defaults are the paper's (section 5)."""

    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10
    data_dir: str | None = None  # default: the system dir / cache (fashion-mnist)
    variant: str = "weightnorm"  # normal | weightnorm | batchnorm | wn+meanonly | meanonly
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
        c = Config(**asdict(self))
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


def run_dir_name(cfg: Config) -> str:
    return f"{cfg.dataset}-{cfg.variant}-s{cfg.seed}"


def schedule(cfg: Config, epoch: int) -> tuple[float, float]:
    """``(lr, beta1)`` for 0-based ``epoch``: constant, then linear to 0 from ``decay_start``."""
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


# --------------------------------------------------------------------------- versions
def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str, world: int = 1) -> str:
    """One line: the accelerator (or CPU), thread count and process count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        acc = torch.cuda.get_device_name(idx)
    else:
        n = torch.get_num_threads()
        acc = f"CPU {cpu_name()}, {n} torch thread{'s' if n > 1 else ''}"
    return acc + (f" x{world} processes" if world > 1 else "")


def version_info(device: str, world: int = 1) -> dict[str, Any]:
    """The code version and machine of a run (for ``version.json``)."""
    commit = _git(["rev-parse", "HEAD"])
    dirty = _git(["status", "--porcelain", "--untracked-files=no"])
    import numpy

    return {
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "wnorm": wnorm.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hardware(device, world),
        "cpu_count": os.cpu_count(),
        "world_size": world,
        "argv": sys.argv,
    }


# --------------------------------------------------------------------------- logging
class RunLog:
    """Prints a line (rank 0 only) and appends it to ``log.txt``."""

    def __init__(self, path: Path | None, echo: TextIO | None | bool = True) -> None:
        self.file = open(path, "w") if path is not None else None  # noqa: SIM115
        self.echo = echo  # True: sys.stdout as it is when a line is printed

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self.echo is True:
            _tqdm_write(line, sys.stdout)
        elif self.echo not in (None, False):
            _tqdm_write(line, self.echo)  # type: ignore[arg-type]
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _tqdm_write(line: str, stream: TextIO) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the repro extra
        print(line, file=stream)
        return
    tqdm.write(line, file=stream)


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


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
        WnormError: ``--option must be ...; got value`` (see :mod:`wnorm.repro.checks`).
    """
    from .checks import check_config
    from .datasets import DATASETS
    from .models import VARIANTS

    check_config(cfg)
    if cfg.dataset not in DATASETS:
        raise WnormError(f"--dataset must be one of {list(DATASETS)}; got {cfg.dataset!r}")
    if cfg.variant not in VARIANTS:
        raise WnormError(f"--variants: unknown {cfg.variant!r}; expected some of {list(VARIANTS)}")


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
    from .checks import refuse_existing

    check(cfg)
    cfg = cfg.resolved()
    dist = dist or Dist()
    if cfg.batch_size % dist.world:
        raise WnormError(f"batch_size {cfg.batch_size} must be divisible by the number of "
                         f"processes {dist.world}")
    if data.x_train.shape[0] == 0:
        raise WnormError(f"{data.name}: the training set is empty")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" and dist.world > 1
                          else cfg.device)
    folder = Path(cfg.out) / run_dir_name(cfg)
    refuse_existing([folder], overwrite)
    torch.manual_seed(cfg.seed)  # the same model on every rank; built before the folder is touched
    model = build(cfg.variant, data.in_channels, cfg.width, noise=cfg.noise,
                  dropout=cfg.dropout).to(device)
    log = RunLog(None, echo=None)
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        config = asdict(cfg) | {"data": data.describe(), "world_size": dist.world}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "version.json").write_text(
            json.dumps(version_info(str(device), dist.world), indent=2) + "\n")
        log = RunLog(folder / "log.txt")
    try:
        _train(cfg, data, dist, device, folder, log, model)
    finally:
        log.close()
    return folder


def _train(cfg: Config, data: ImageData, dist: Dist, device: torch.device, folder: Path,
           log: RunLog, model: nn.Module) -> None:
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
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.eps)
    if cfg.variant == "forced":
        project_after_step(opt, net)  # forced WN: v back on its sphere after every step

    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)  # the authors' script drops the last partial batch
    metrics = (folder / "metrics.jsonl").open("w") if dist.main else None
    try:
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
                with _progress(steps, desc, cfg.progress and dist.main) as bar:
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
                            if s % 10 == 0 or s == steps - 1:
                                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                                err=f"{float(wrong) / seen:.3f}")
            except WnormError:
                if _finite(model):
                    raise
                broken = "non-finite weights"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            tr_loss, tr_wrong, tr_seen = dist.all_sum([float(loss_sum), float(wrong),
                                                       float(seen)], device)
            if broken is None and math.isfinite(tr_loss):
                t1 = time.perf_counter()
                try:
                    te_loss, te_err = _evaluate(model, data.x_test, data.y_test,
                                                cfg.eval_batch_size, dist, device)
                except WnormError:
                    if _finite(model):
                        raise
                    broken = "non-finite weights"
            if broken is not None or not math.isfinite(tr_loss):
                if metrics is not None:
                    metrics.write(json.dumps({
                        "epoch": epoch + 1, "diverged": True, "loss": broken or str(tr_loss),
                        "train_loss": None, "train_error": None, "test_loss": None,
                        "test_error": None, "seconds": seconds, "eval_seconds": 0.0, "lr": lr,
                        "beta1": beta1}) + "\n")
                    metrics.flush()
                log(f"epoch {epoch + 1}/{cfg.epochs}: "
                    + (f"training loss became {tr_loss}" if broken is None else broken)
                    + f" (lr {lr:g}): diverged, stopping this run (a lower --lr may help)")
                return
            row = {
                "epoch": epoch + 1,
                "train_loss": tr_loss / tr_seen,
                "train_error": tr_wrong / tr_seen,
                "test_loss": te_loss,
                "test_error": te_err,
                "seconds": seconds,
                "eval_seconds": time.perf_counter() - t1,
                "lr": lr,
                "beta1": beta1,
            }
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                f"error {100 * row['train_error']:.2f}%  test loss {te_loss:.4f} "
                f"error {100 * te_err:.2f}%  {seconds:.1f}s")
    finally:
        if metrics is not None:
            metrics.close()
