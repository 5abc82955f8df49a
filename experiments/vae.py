r"""Convolutional VAE on binarized Fashion-MNIST, normal vs weight norm (paper, section 6).

Trains :math:`q(z|x) = N(\mu(x), \sigma^2(x))`, :math:`p(z) = N(0, I)`,
:math:`p(x|z) = \text{Bernoulli}(\text{logits}(z))` by maximizing the single-sample bound

.. math::
    \mathcal{L}(x) = \mathbb{E}_{q}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z))
    \;\le\; \log p(x),

reported as :math:`-\mathcal{L}` in nats per image (lower is better). Pixels are binarized once
(Bernoulli draws of the [0, 1] intensities, a fixed seed, the same for every run).

Network (ELU, ResNet-style blocks :math:`x + \text{conv}(\text{elu}(\text{conv}(\text{elu}(x))))`)::

    encoder: conv 3x3/2 (1->C) 28->14 ; B blocks(C) ; elu ; conv 3x3/2 (C->2C) 14->7 ;
             B blocks(2C) ; elu ; dense -> (mu, log sigma^2) of size latent
    decoder: dense latent -> 2C*7*7 ; B blocks(2C) ; elu ; conv-transpose 4x4/2 -> C, 14x14 ;
             B blocks(C) ; elu ; conv-transpose 4x4/2 -> 1, 28x28 (Bernoulli logits)

Variants: ``normal`` = plain layers, weights :math:`N(0, 0.05^2)`, then the data-dependent init
of the plain layers (``wnorm.data_init(..., include_plain=True)``, as the paper's baseline);
``weightnorm`` = the same, then ``wnorm.apply`` and ``wnorm.data_init``. Adam, batch 100.

Run (from the repository root; the committed results: 5 to 20 s per epoch on one CPU thread,
depending on load)::

    python -m experiments.vae --seeds 0,1,2 --out results/vae
    # on a GPU, the whole training set and a wider network (every step stays on the device:
    # no host sync until the epoch ends)
    python -m experiments.vae --device cuda --seeds 0,1,2 --train-subset 60000 \
        --test-subset 10000 --channels 64 --latent 32 --blocks 2 --epochs 30 --out runs/vae-gpu
    python -m experiments.report results/vae results/seq results/dqn --out results/others-report

Each (variant, seed) writes ``<out>/vae-<variant>-s<seed>/`` (:mod:`experiments.common`); ``metrics.jsonl`` has one line per epoch: ``epoch``, ``train_neg_elbo`` (mean over
the epoch's batches), ``test_neg_elbo``, ``test_recon``, ``test_kl`` (nats per image, one fixed
draw of :math:`\epsilon` per test image), ``seconds``, ``eval_seconds``, ``steps`` (so far) and
``step_losses`` (``[step, batch -ELBO]`` every ``log_every`` steps).
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

__all__ = ["VAEConfig", "ConvVAE", "neg_elbo", "parser", "train_one", "main"]


# --------------------------------------------------------------------------- defaults
@dataclass
class VAEConfig:
    """One VAE run; the defaults are the committed CPU-sized run."""

    experiment: str = "vae"
    variant: str = "weightnorm"  # normal | weightnorm
    seed: int = 0
    data_dir: str | None = None  # default: the system dir / cache (see experiments.data)
    train_subset: int | None = 10000
    test_subset: int | None = 2000
    epochs: int = 10
    channels: int = 16  # C: 16 at 14x14, 32 at 7x7
    latent: int = 16
    blocks: int = 1  # residual blocks per resolution
    batch_size: int = 100
    lr: float = 0.001
    init_examples: int = 500
    init_scale: float = 1.0
    log_every: int = 10  # steps between logged training bounds
    binarize: bool = True  # False: Bernoulli likelihood on the [0, 1] intensities themselves
    out: str = "runs/vae"
    threads: int | None = 1
    device: str = "auto"


VARIANTS = ("normal", "weightnorm")
#: --quick: tiny sizes that run in seconds (the tests)
QUICK = {"train_subset": 200, "test_subset": 100, "epochs": 2, "channels": 4, "latent": 4,
         "batch_size": 50, "init_examples": 50, "log_every": 1}


# --------------------------------------------------------------------------- model
class ResBlock(nn.Module):
    r""":math:`x + \text{conv}_2(\text{elu}(\text{conv}_1(\text{elu}(x))))`, 3x3, ``c`` channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class ConvVAE(nn.Module):
    """``(N, 1, 28, 28)`` in [0, 1] -> ``(logits, mu, logvar)``; see the module docstring."""

    def __init__(self, channels: int = 16, latent: int = 16, blocks: int = 1) -> None:
        super().__init__()
        c, c2 = channels, 2 * channels
        self.latent = latent
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1), *[ResBlock(c) for _ in range(blocks)],
            nn.ELU(), nn.Conv2d(c, c2, 3, stride=2, padding=1),
            *[ResBlock(c2) for _ in range(blocks)], nn.ELU(), nn.Flatten(),
            nn.Linear(c2 * 49, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, c2 * 49), nn.Unflatten(1, (c2, 7, 7)),
            *[ResBlock(c2) for _ in range(blocks)], nn.ELU(),
            nn.ConvTranspose2d(c2, c, 4, stride=2, padding=1),
            *[ResBlock(c) for _ in range(blocks)], nn.ELU(),
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1))
        with torch.no_grad():  # the authors' init: N(0, 0.05^2) weights, zero biases
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    m.weight.normal_(0.0, 0.05)
                    m.bias.zero_()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(2 * x - 1).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z), mu, logvar


def neg_elbo(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-image :math:`-\log p(x|z)` (Bernoulli) and :math:`\mathrm{KL}(q\|p)`, in nats."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)
    return recon, kl


def build(variant: str, cfg: VAEConfig) -> ConvVAE:
    if variant not in ("normal", "weightnorm"):
        raise WnormError(f"vae: unknown variant {variant!r}; expected 'normal' or 'weightnorm'")
    model = ConvVAE(cfg.channels, cfg.latent, cfg.blocks)
    if variant == "weightnorm":
        wnorm.apply(model)
    return model


# --------------------------------------------------------------------------- data
def load_binarized(cfg: VAEConfig) -> tuple[Tensor, Tensor, dict[str, object]]:
    """Train and test images ``(N, 1, 28, 28)`` in {0, 1} (or [0, 1]) and a description."""
    from .data import load_fashion_mnist

    data = load_fashion_mnist(cfg.data_dir, train_subset=cfg.train_subset,
                              test_subset=cfg.test_subset)
    gen = torch.Generator().manual_seed(1234)  # one binarization for every run
    out = []
    for x in (data.x_train, data.x_test):
        x01 = ((x * 128.0 + 127.5) / 255.0).clamp(0, 1)
        out.append(torch.bernoulli(x01, generator=gen) if cfg.binarize else x01)
    desc = data.describe() | {"preprocessing": "x/255, then one fixed Bernoulli draw per pixel "
                                               "(seed 1234)" if cfg.binarize else "x/255"}
    return out[0], out[1], desc


# --------------------------------------------------------------------------- training
def _evaluate(model: ConvVAE, x: Tensor, eps: Tensor, batch: int) -> tuple[float, float, float]:
    """Mean -ELBO, reconstruction and KL (nats) on ``x`` with the fixed draws ``eps`` (both on
    the model's device; one wait for the device at the end)."""
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            recon, kl = neg_elbo(xb, *model(xb, eps[i:i + batch]))
            sums += torch.stack([recon.sum(dtype=torch.float64), kl.sum(dtype=torch.float64)])
    model.train()
    recon_sum, kl_sum = sums.tolist()
    n = max(x.shape[0], 1)
    return (recon_sum + kl_sum) / n, recon_sum / n, kl_sum / n


def run_name(cfg: VAEConfig) -> str:
    return f"vae-{cfg.variant}-s{cfg.seed}"


def train_one(cfg: VAEConfig, x_train: Tensor, x_test: Tensor, data_desc: dict[str, object],
              echo: bool = True, *, overwrite: bool = False, progress_bar: bool = False
              ) -> RunFolder:
    """Train ``cfg.variant`` with ``cfg.seed``; writes and returns the run folder.

    The steps never wait for the device: the bounds stay on it until the epoch ends. A bound
    that turns NaN/inf stops the run at the end of that epoch: its last metrics line is
    ``{"epoch": e, "diverged": true, "step": s, "loss": "nan"}`` (s the first bad step) and
    the log says so.

    Raises:
        WnormError: a bad setting, or the folder already holds a run and ``overwrite`` is
            False (before the folder is touched).
    """
    device = prepare(cfg)
    n = x_train.shape[0]
    if n < 2:
        raise WnormError(f"vae: need at least 2 training images; got {n}")
    cfg = batch_that_runs(cfg, n)
    torch.manual_seed(cfg.seed)
    model = build(cfg.variant, cfg).to(device)  # before the folder is touched
    with RunFolder(Path(cfg.out) / run_name(cfg), cfg, device, {"data": data_desc},
                   echo=echo, overwrite=overwrite) as folder:
        log = folder.log
        order = torch.Generator().manual_seed(cfg.seed)
        init_x = x_train[torch.randperm(n, generator=order)[:cfg.init_examples]].to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = wnorm.data_init(model, init_x, init_scale=cfg.init_scale,
                                  include_plain=cfg.variant == "normal")
        log(f"vae-{cfg.variant}-s{cfg.seed}: {n} train / {x_test.shape[0]} test images, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}")
        kind = "plain layers" if cfg.variant == "normal" else "weight-normalized layers"
        log(f"data init on {init_x.shape[0]} images ({kind}): {len(rep.initialized)} "
            f"initialized, {len(rep.skipped)} skipped")
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batch = min(cfg.batch_size, n)
        steps_per_epoch = max(1, n // batch)
        x_dev, x_test_dev = x_train.to(device), x_test.to(device)
        # the same eps for every epoch, run and variant
        eps = torch.randn(x_test.shape[0], model.latent,
                          generator=torch.Generator().manual_seed(0)).to(device)

        def step_loss(idx: Tensor) -> tuple[Tensor]:
            xb = x_dev[idx]
            recon, kl = neg_elbo(xb, *model(xb))
            return ((recon + kl).mean(),)

        step = 0
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=order).to(device)
            (values,), seconds = train_epoch(
                opt, step_loss, perm, batch, steps_per_epoch,
                f"vae {cfg.variant} s{cfg.seed} {epoch}/{cfg.epochs}", progress_bar)
            if stop_if_diverged(folder, values, step, epoch, cfg, "the bound"):
                break
            logged = logged_steps(values, step, cfg.log_every)
            step += steps_per_epoch
            t1 = time.perf_counter()
            test, recon_t, kl_t = _evaluate(model, x_test_dev, eps, 500)
            row = {"epoch": epoch, "train_neg_elbo": math.fsum(values) / steps_per_epoch,
                   "test_neg_elbo": test, "test_recon": recon_t, "test_kl": kl_t,
                   "seconds": seconds, "eval_seconds": time.perf_counter() - t1, "steps": step,
                   "step_losses": logged}
            folder.write(row)
            log(f"epoch {epoch}/{cfg.epochs}  train -ELBO {row['train_neg_elbo']:.2f}  test "
                f"-ELBO {test:.2f} (recon {recon_t:.2f}, KL {kl_t:.2f}) nats  {seconds:.1f}s")
    return folder


# --------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    return run_parser("vae", __doc__, VAEConfig, variants=VARIANTS, seeds="0,1,2")


def main(argv: list[str] | None = None) -> int:
    """Train every (variant, seed) asked for; returns the exit status."""
    return run_main(parser(), argv, lambda args: run_configs(VAEConfig, args, QUICK, VARIANTS),
                    run_name, load_binarized, train_one)


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
