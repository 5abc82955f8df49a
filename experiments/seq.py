r"""An LSTM reading Fashion-MNIST row by row, normal vs weight norm (paper, section 6).

The paper applied weight normalization straight to DRAW's LSTM weights and saw a large
convergence speed-up. Here each image is a sequence of its 28 rows (28 inputs each); an LSTM
with ``hidden`` units reads them, and a dense layer classifies its last hidden state:

.. math::
    h_t, c_t = \mathrm{LSTM}(x_t, h_{t-1}, c_{t-1}),\qquad \text{logits} = W h_{28} + b .

Variants: ``normal`` = plain ``nn.LSTM`` (PyTorch's default uniform init) and a dense head with
the plain-layer data init (``include_plain=True``); ``weightnorm`` = the same model after
``wnorm.apply`` (every ``weight_ih``/``weight_hh`` gate row and the head get
:math:`w = g\,v/\lVert v\rVert`, starting from the same weights), then ``wnorm.data_init``: the
head is initialized, the LSTM is reported as skipped (the paper's init does not apply to
recurrent layers). Both variants compute the same function at step 0. Adam, batch 100.

Run (from the repository root; the committed results)::

    python -m experiments.seq --seeds 0,1,2 --out results/seq
    # on a GPU, the whole training set and a wider LSTM (no host sync until the epoch ends)
    python -m experiments.seq --device cuda --seeds 0,1,2 --train-subset 60000 \
        --test-subset 10000 --hidden 512 --epochs 20 --out runs/seq-gpu

Each (variant, seed) writes ``<out>/seq-<variant>-s<seed>/``; ``metrics.jsonl`` has one line per
epoch: ``epoch``, ``train_loss`` (mean over the epoch), ``train_error``, ``test_loss``,
``test_error``, ``seconds``, ``eval_seconds``, ``steps`` and ``step_losses``
(``[step, batch cross-entropy]`` every ``log_every`` steps).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

from .common import (RunFolder, batch_that_runs, logged_steps, prepare, run_configs, run_main,
                     run_parser, stop_if_diverged, train_epoch)
from .data import ImageData, load_fashion_mnist

__all__ = ["SeqConfig", "RowLSTM", "build", "parser", "train_one", "main"]


# --------------------------------------------------------------------------- defaults
# as in vae.py and dqn.py, on purpose: the script's defaults (fields, VARIANTS, QUICK) in one block
@dataclass
class SeqConfig:
    """One LSTM run; the defaults are the committed CPU-sized run."""

    experiment: str = "seq"
    variant: str = "weightnorm"  # normal | weightnorm
    seed: int = 0
    data_dir: str | None = None
    train_subset: int | None = 20000
    test_subset: int | None = 2000
    epochs: int = 4
    hidden: int = 128
    batch_size: int = 100
    lr: float = 0.001
    init_examples: int = 500
    log_every: int = 10
    out: str = "runs/seq"
    threads: int | None = 1
    device: str = "auto"


VARIANTS = ("normal", "weightnorm")
#: --quick: tiny sizes that run in seconds (the tests)
QUICK = {"train_subset": 200, "test_subset": 100, "epochs": 2, "hidden": 8,
         "batch_size": 50, "init_examples": 50, "log_every": 1}


# --------------------------------------------------------------------------- model
class RowLSTM(nn.Module):
    """``(N, 1, 28, 28)`` -> ``(N, classes)``: an LSTM over the 28 rows, a dense head."""

    def __init__(self, hidden: int = 128, rows: int = 28, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(rows, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, _) = self.lstm(x.reshape(x.shape[0], -1, x.shape[-1]))  # rows as time steps
        return self.head(h[-1])


def build(variant: str, hidden: int) -> RowLSTM:
    if variant not in ("normal", "weightnorm"):
        raise WnormError(f"seq: unknown variant {variant!r}; expected 'normal' or 'weightnorm'")
    model = RowLSTM(hidden)
    if variant == "weightnorm":
        wnorm.apply(model)
    return model


# --------------------------------------------------------------------------- training
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and error on ``x, y`` (on the model's device; one wait at the end)."""
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], 500):
            xb, yb = x[i:i + 500], y[i:i + 500]
            logits = model(xb)
            sums += torch.stack([F.cross_entropy(logits, yb, reduction="sum").double(),
                                 (logits.argmax(1) != yb).sum().double()])
    model.train()
    loss, wrong = sums.tolist()
    n = max(x.shape[0], 1)
    return loss / n, wrong / n


def run_name(cfg: SeqConfig) -> str:
    return f"seq-{cfg.variant}-s{cfg.seed}"


def train_one(cfg: SeqConfig, data: ImageData, echo: bool = True, *, overwrite: bool = False,
              progress_bar: bool = False) -> RunFolder:
    """Train ``cfg.variant`` with ``cfg.seed`` on ``data``; writes and returns the run folder.

    The steps never wait for the device: losses and errors stay on it until the epoch ends. A
    loss that turns NaN/inf stops the run at the end of that epoch: its last metrics line is
    ``{"epoch": e, "diverged": true, "step": s, "loss": "nan"}`` (s the first bad step) and the
    log says so.

    Raises:
        WnormError: a bad setting, or the folder already holds a run and ``overwrite`` is
            False (before the folder is touched).
    """
    device = prepare(cfg)
    x_train, y_train = data.x_train, data.y_train
    n = x_train.shape[0]
    if n < 2:
        raise WnormError(f"seq: need at least 2 training images; got {n}")
    cfg = batch_that_runs(cfg, n)
    name = run_name(cfg)
    torch.manual_seed(cfg.seed)
    model = build(cfg.variant, cfg.hidden).to(device)
    order = torch.Generator().manual_seed(cfg.seed)
    init_x = x_train[torch.randperm(n, generator=order)[:cfg.init_examples]].to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LSTM's "skipped" is in the report, logged below
        rep = wnorm.data_init(model, init_x, include_plain=cfg.variant == "normal")
    summary = (", ".join(f"{r.name} {r.status}" for r in rep)
               + ("; lstm: plain, PyTorch default init" if cfg.variant == "normal" else ""))
    with RunFolder(Path(cfg.out) / name, cfg, device,
                   {"data": data.describe(), "init_summary": summary},
                   echo=echo, overwrite=overwrite) as folder:
        log = folder.log
        log(f"{name}: {n} train / {data.x_test.shape[0]} test sequences of 28 rows, "
            f"hidden {cfg.hidden}, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"device {device}")
        log(f"data init on {init_x.shape[0]} images:\n{rep}")
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batch = min(cfg.batch_size, n)
        steps_per_epoch = max(1, n // batch)
        xd, yd = x_train.to(device), y_train.to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)

        def step_loss(idx: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(xd[idx])
            error = (logits.detach().argmax(1) != yd[idx]).float().mean()
            return F.cross_entropy(logits, yd[idx]), error

        step = 0
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=order).to(device)
            (values, errs), seconds = train_epoch(
                opt, step_loss, perm, batch, steps_per_epoch,
                f"seq {cfg.variant} s{cfg.seed} {epoch}/{cfg.epochs}", progress_bar)
            if stop_if_diverged(folder, values, step, epoch, cfg, "the training loss"):
                break
            logged = logged_steps(values, step, cfg.log_every)
            step += steps_per_epoch
            t1 = time.perf_counter()
            te_loss, te_err = _evaluate(model, x_test, y_test)
            row = {"epoch": epoch, "train_loss": math.fsum(values) / steps_per_epoch,
                   "train_error": math.fsum(errs) / steps_per_epoch, "test_loss": te_loss,
                   "test_error": te_err, "seconds": seconds,
                   "eval_seconds": time.perf_counter() - t1, "steps": step,
                   "step_losses": logged}
            folder.write(row)
            log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} error "
                f"{100 * row['train_error']:.2f}%  test loss {te_loss:.4f} error "
                f"{100 * te_err:.2f}%  {seconds:.1f}s")
    return folder


# --------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    return run_parser("seq", __doc__, SeqConfig, variants=VARIANTS, seeds="0,1,2")


def _load(cfg: SeqConfig) -> tuple[ImageData]:
    return (load_fashion_mnist(cfg.data_dir, train_subset=cfg.train_subset,
                               test_subset=cfg.test_subset),)


def main(argv: list[str] | None = None) -> int:
    """Train every (variant, seed) asked for; returns the exit status."""
    return run_main(parser(), argv, lambda args: run_configs(SeqConfig, args, QUICK, VARIANTS),
                    run_name, _load, train_one)


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
