r"""Learning-rate robustness (PAPER.md section 2): train ``normal``, ``weightnorm`` and ``forced``
over learning rates spanning orders of magnitude, and record :math:`\lVert v\rVert` as it grows.

The claim. Under plain SGD each weight-norm step is orthogonal to :math:`v`, so
:math:`\lVert v'\rVert = \sqrt{1 + C^2}\,\lVert v\rVert` with :math:`C = \lVert\Delta v\rVert/\lVert v\rVert`:
a too-large learning rate grows :math:`\lVert v\rVert` quickly, which shrinks the effective step
:math:`g/\lVert v\rVert` and stabilizes training. ``forced`` (EDM2) renormalizes :math:`v` every
step, so its :math:`\lVert v\rVert` stays flat and the mechanism is switched off: the contrast.

Commands::

    # the committed run: a few minutes on one CPU core (results/lr-sweep/)
    python -m wnorm.repro lr-sweep --threads 1 --out results/lr-sweep/runs
    python -m wnorm.repro report results/lr-sweep/runs --out results/lr-sweep

    # Adam instead of SGD, the paper's convnet instead of the MLP
    python -m wnorm.repro lr-sweep --optimizer adam --model paper --width 0.125 --out runs/sw

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
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wnorm import WnormError

from .datasets import ImageData
from .models import MLP, MLP_VARIANTS, VARIANTS, build, initialize, weight_normalized_layers
from .train import RunLog, version_info

__all__ = ["SweepConfig", "LRS", "SWEEP_VARIANTS", "run_dir_name", "train_one", "v_norms"]

# --------------------------------------------------------------------------- defaults
#: Learning rates of the committed sweep: 1e-4 .. 30, log spaced (5.5 orders of magnitude).
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)
SWEEP_VARIANTS = ("normal", "weightnorm", "forced")


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
    progress: bool = True  # unused (one log line per epoch); kept for the shared CLI options

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def run_dir_name(cfg: SweepConfig) -> str:
    return f"{cfg.dataset}-{cfg.model}-{cfg.variant}-{cfg.optimizer}-lr{cfg.lr:g}-s{cfg.seed}"


def _check(cfg: SweepConfig) -> None:
    allowed = MLP_VARIANTS if cfg.model == "mlp" else VARIANTS
    if cfg.model not in ("mlp", "paper"):
        raise WnormError(f"lr-sweep: --model must be mlp or paper; got {cfg.model!r}")
    if cfg.variant not in allowed:
        raise WnormError(f"lr-sweep: variant {cfg.variant!r} is not one of {list(allowed)} "
                         f"(model {cfg.model})")
    if cfg.optimizer not in ("sgd", "adam"):
        raise WnormError(f"lr-sweep: --optimizer must be sgd or adam; got {cfg.optimizer!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise WnormError(f"lr-sweep: learning rates must be positive; got {cfg.lr!r}")
    if cfg.vnorm_every < 1 or cfg.epochs < 1:
        raise WnormError(f"lr-sweep: --epochs and --vnorm-every must be >= 1; got "
                         f"{cfg.epochs}, {cfg.vnorm_every}")


# --------------------------------------------------------------------------- one run
def v_norms(layers: dict[str, tuple[Tensor, int | None, str]]) -> dict[str, float]:
    r"""``{layer: mean over output units of }\lVert v\rVert`` (the whole tensor's norm if dim is None)."""
    out = {}
    with torch.no_grad():
        for name, (v, dim, _) in layers.items():
            flat = v.reshape(1, -1) if dim is None else v.movedim(dim, 0).flatten(1)
            out[name] = float(flat.double().norm(dim=1).mean())
    return out


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


def train_one(cfg: SweepConfig, data: ImageData, echo: bool = True) -> Path:
    """Train one (variant, lr, seed) at a constant learning rate; returns the run folder."""
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    folder = Path(cfg.out) / run_dir_name(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg) | {"kind": "lr-sweep", "data": data.describe()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "version.json").write_text(json.dumps(version_info(str(device)), indent=2) + "\n")
    log = RunLog(folder / "log.txt", echo=sys.stdout if echo else None)
    try:
        _train(cfg, data, device, folder, log)
    finally:
        log.close()
    return folder


def _train(cfg: SweepConfig, data: ImageData, device: torch.device, folder: Path,
           log: RunLog) -> None:
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    n = x.shape[0]
    if n == 0:
        raise WnormError(f"{data.name}: the training set is empty")
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
    layers = weight_normalized_layers(model)
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    step = 0
    diverged_at: int | None = None
    model.train()
    with (folder / "metrics.jsonl").open("w") as metrics, \
            (folder / "vnorm.jsonl").open("w") as vfile:
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=order).to(device)
            loss_sum, wrong, seen = 0.0, 0.0, 0
            last_v: dict[str, float] = {}
            t0 = time.perf_counter()
            for s in range(steps):
                idx = perm[s * batch:(s + 1) * batch]
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                step += 1
                if layers and (step == 1 or step % cfg.vnorm_every == 0 or s == steps - 1):
                    last_v = v_norms(layers)  # after the forward: the norm it used
                    vfile.write(json.dumps({"step": step, "epoch": epoch, "v_norm": last_v})
                                + "\n")
                value = float(loss)
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
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if diverged_at is not None:
                log(f"epoch {epoch}/{cfg.epochs}: training loss became NaN/inf at step "
                    f"{diverged_at} (lr {cfg.lr:g}): diverged, stopping")
                return
            v_txt = f"  mean ||v|| {mean_v:.4g}" if mean_v is not None else ""
            log(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} error "
                f"{100 * row['train_error']:.2f}%  test error {100 * row['test_error']:.2f}%"
                f"{v_txt}  {seconds:.1f}s")


def sweep(base: SweepConfig, variants: list[str], lrs: list[float], seeds: list[int],
          data: ImageData, echo: bool = True) -> list[Path]:
    """Every (seed, lr, variant), seed-major so that an interrupted sweep has whole seeds."""
    folders = []
    for seed in seeds:
        for lr in lrs:
            for variant in variants:
                cfg = SweepConfig(**(asdict(base) | {"variant": variant, "lr": lr, "seed": seed}))
                _check(cfg)
                folders.append(train_one(cfg, data, echo=echo))
    return folders
