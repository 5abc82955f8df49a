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
:mod:`experiments.classify`, so :mod:`experiments.report` reads both. What makes it fast:

- the dataset lives on the device; a step gathers its batch there from an index (each epoch's
  data order is drawn on the host, as in ``classify``, and copied once per epoch); input noise
  and dropout are drawn on the device; losses and errors accumulate on the device, so the
  steps never wait for it (one wait per epoch, for that epoch's numbers);
- a variant's seeds train as one network (``--stack`` seeds side by side as grouped
  convolutions, :mod:`experiments.seed_stack`, exactly equivalent to separate runs), so one
  launch does three seeds' work;
- the loss is compiled (``--compile``, torch.compile; ``reduce-overhead`` adds CUDA graphs);
  should compiling fail, the run says so in its log and config and goes on eagerly;
- bf16 autocast and channels-last (``--bf16``, ``--channels-last``; on by default on CUDA);
  TF32 (``--tf32``) for what stays in float32; each run's config.json records what it used;
- one process per stack, ``--procs`` at a time (default: all five variants at once): their
  compilation and host work overlap, and the GPU interleaves their kernels.

The plan, before any measurement: compute from ``python -m experiments.classify_gpu --plan``
(FLOPs counted by torch's FlopCounterMode, activations by forward hooks; the two rates are this
workplace's measured H200 ceilings, times the efficiencies assumed in :data:`PLAN`). The full
run writes ``harness.json`` with the measured step and epoch times beside these numbers.

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
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wnorm import WnormError

from .classify import Config, check, run_dir_name, schedule
from .common import (RunFolder, add_options, config_from_args, hardware, precision_info,
                     precision_text, read_jsonl, refuse_existing, resolve_device, split_list)
from .data import ImageData, load
from .nets import PAPER_VARIANTS, build, initialize
from .seed_stack import STACKABLE, stack, stack_inputs

__all__ = ["GPUConfig", "PLAN", "StackTrainer", "check_gpu", "plan", "plan_text", "run_all",
           "time_variants", "timing_text", "train_stack", "main"]


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


VARIANTS = PAPER_VARIANTS
SEEDS = "0,1,2"
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
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


# --------------------------------------------------------------------------- plan
def _counts(variant: str, width: float, in_channels: int = 1, size: int = 28
            ) -> tuple[float, float]:
    """(training FLOPs, forward activation elements) per example, counted on the meta device
    (shapes only, nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = build(variant, in_channels, width).to("meta")
    elements = [0]

    def count(module: nn.Module, args: Any, out: Tensor) -> None:
        elements[0] += out.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    x = torch.empty(2, in_channels, size, size, device="meta")  # two: batch norm needs more
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    for h in hooks:
        h.remove()
    return counter.get_total_flops() / 2, elements[0] / 2


def plan(cfg: GPUConfig, variants: tuple[str, ...] = VARIANTS, train: int = 60000,
         test: int = 10000, assumptions: dict[str, float] = PLAN) -> dict[str, Any]:
    """The predicted step, epoch and run times of the full comparison, from counted FLOPs and
    activation bytes and the rates in ``assumptions``."""
    a = assumptions
    s, b = cfg.stack, cfg.batch_size
    steps = train // b
    rate = a["bf16_flops_per_s"] * a["conv_efficiency"]
    bw = a["bytes_per_s"] * a["memory_efficiency"]
    rows, gpu_s, conv_s = {}, 0.0, 0.0
    for v in variants:
        flops, elems = _counts(v, cfg.width)
        step_flops = flops * b * s
        step_bytes = elems * b * s * a["bytes_per_element"] * a["activation_passes"]
        step = step_flops / rate + step_bytes / bw + a["overhead_ms_per_step"] / 1e3
        # evaluation: a forward pass (a third of a training step's FLOPs, two activation
        # passes) over the test set, for every seed of the stack
        eval_s = test * s * (flops / 3 / rate + elems * a["bytes_per_element"] * 2 / bw)
        epoch = steps * step + eval_s
        rows[v] = {"gflop_per_step": step_flops / 1e9, "act_gb_per_step": step_bytes / 1e9,
                   "step_ms": 1e3 * step, "epoch_s": epoch, "run_s": cfg.epochs * epoch}
        gpu_s += cfg.epochs * epoch
        conv_s += cfg.epochs * (steps * step_flops + test * s * flops / 3) / a["bf16_flops_per_s"]
    total = gpu_s + a["startup_s"]
    # the convolution efficiency at which the whole run takes the budget: conv_s / efficiency
    # is the convolutions' time, the rest does not depend on it
    rest = total - conv_s / a["conv_efficiency"]
    break_even = conv_s / (a["budget_s"] - rest) if a["budget_s"] > rest else math.inf
    return {"variants": rows, "steps_per_epoch": steps, "steps_per_process": cfg.epochs * steps,
            "epochs": cfg.epochs, "processes": len(variants), "seeds_per_process": s,
            "gpu_s": gpu_s, "total_s": total, "break_even_efficiency": break_even,
            "train": train, "batch_size": b, "assumptions": dict(a)}


def plan_text(p: dict[str, Any]) -> str:
    """The plan as the reStructuredText block of this module's docstring."""
    import textwrap

    rule = "=========== ========== ============ ======== ======== ======="
    lines = [rule, "variant     GFLOP/step act. GB/step step ms  epoch s  run s", rule]
    for v, r in p["variants"].items():
        lines.append(f"{v:<12}{r['gflop_per_step']:<11.1f}{r['act_gb_per_step']:<13.2f}"
                     f"{r['step_ms']:<9.2f}{r['epoch_s']:<9.2f}{r['run_s']:.1f}")
    lines += [rule, ""]
    a = p["assumptions"]
    prose = (
        f"A step trains {p['seeds_per_process']} seeds at once (batch {p['batch_size']} each); "
        f"{p['steps_per_epoch']} steps per epoch ({p['train']} images), {p['epochs']} epochs: "
        f"{p['steps_per_process']} steps per process, {p['processes']} processes at once, "
        "time-sliced on one GPU (no kernel of one runs beside another's, so their GPU times "
        f"add up). Predicted: {p['gpu_s']:.0f} s on the GPU + {a['startup_s']:.0f} s of "
        f"start-up and compilation = {p['total_s']:.0f} s ({p['total_s'] / 60:.1f} min). "
        f"Break-even: the {a['budget_s'] / 60:.0f}-minute budget holds while the convolutions "
        f"run at {100 * p['break_even_efficiency']:.0f}% or more of the bf16 rate (the plan "
        f"assumes {100 * a['conv_efficiency']:.0f}%).")
    return "\n".join(lines + textwrap.wrap(prose, 95))


# --------------------------------------------------------------------------- settings
def resolved(cfg: GPUConfig) -> GPUConfig:
    """``cfg`` with every ``auto``/``None`` made explicit for its device."""
    c = cfg.resolved()
    cuda = c.device.startswith("cuda")
    if c.compile == "auto":
        c.compile = "default" if cuda else "off"
    if c.bf16 is None:
        c.bf16 = cuda
    if c.channels_last is None:
        c.channels_last = cuda
    return c


def check_gpu(cfg: GPUConfig) -> None:
    """:func:`experiments.classify.check` plus this harness's own options.

    Raises:
        WnormError: naming the option.
    """
    check(cfg)
    if cfg.compile not in COMPILE_MODES:
        raise WnormError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got "
                         f"{cfg.compile!r}")
    if cfg.variant not in STACKABLE:
        raise WnormError(f"--variants: {cfg.variant!r} cannot be trained here (seeds are "
                         f"stacked); expected some of {list(STACKABLE)}")


def _set_backends(cfg: GPUConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


# --------------------------------------------------------------------------- training
class StackTrainer:
    """One variant's seeds (``cfgs``, same settings but the seed) as one network on ``device``,
    with the data already there: :meth:`epoch` trains one epoch and returns its numbers.

    The steps never wait for the device; the only waits are one per epoch (its losses and
    errors) and those of :func:`wnorm.data_init` at the start.
    """

    def __init__(self, cfgs: list[GPUConfig], data: ImageData, device: torch.device,
                 log: Any = print) -> None:
        cfg = cfgs[0]
        self.cfg, self.device, self.log = cfg, device, log
        self.seeds = [c.seed for c in cfgs]
        s = len(cfgs)
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.n = self.x_train.shape[0]
        nets = []
        for c in cfgs:  # each seed's network exactly as experiments.classify builds it
            torch.manual_seed(c.seed)
            nets.append(build(c.variant, data.in_channels, c.width, noise=c.noise,
                              dropout=c.dropout))
        model = nets[0] if s == 1 else stack(nets)
        self.model = model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the same data order per seed as experiments.classify (a host generator per seed)
        self.orders = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        init = torch.stack([torch.randperm(self.n, generator=g)[:cfg.init_examples]
                            for g in self.orders]).to(device)
        self.init_message = initialize(self.model, self._inputs(self.x_train[init]),
                                       cfg.init_scale)
        torch.manual_seed(cfg.seed * 1000 + 1)  # noise and dropout
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # fused: one kernel for every tensor, and its step counts stay on the device (the
        # default keeps them on the host and reads them every step)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        self.compile = cfg.compile
        self._loss_fn, self._eval_fn = self._losses, self._logits
        if cfg.compile != "off":
            self._loss_fn = torch.compile(self._losses, mode=_mode(cfg.compile))
            self._eval_fn = torch.compile(self._logits, mode=_mode(cfg.compile))
        self.alive = [True] * s
        self.batch = min(cfg.batch_size, self.n)
        self.steps = max(1, self.n // self.batch)  # the last partial batch is dropped

    # the pieces a step is made of -----------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        """``(S, N, C, H, W)`` -> the network's input ``(N, S*C, H, W)``."""
        x = stack_inputs(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _logits(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.bf16)):
            out = self.model(x)
        return out.float().reshape(x.shape[0], len(self.seeds), -1)

    def _losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-seed mean cross-entropy and error count of a batch, ``y`` being ``(S, B)``."""
        logits = self._logits(x)
        losses = F.cross_entropy(logits.permute(0, 2, 1), y.T, reduction="none").mean(0)
        wrong = (logits.detach().argmax(-1) != y.T).sum(0)
        return losses, wrong

    def step(self, idx: Tensor, sums: Tensor) -> None:
        """One optimizer step on the examples ``idx`` ``(S, B)``; adds each seed's loss x B
        and error count to ``sums`` ``(2, S)`` (float64, on the device)."""
        x, y = self._inputs(self.x_train[idx]), self.y_train[idx]
        losses, wrong = self._loss_fn(x, y)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # each seed's parameters get their own loss's gradient
        self.opt.step()
        sums += torch.stack([losses.detach().double() * idx.shape[1], wrong.double()])

    def first_step(self, idx: Tensor, sums: Tensor) -> None:
        """:meth:`step`, falling back to eager (logged) should compilation fail."""
        if self.compile == "off":
            return self.step(idx, sums)
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.step(idx, sums)
        except Exception as e:  # noqa: BLE001 - any compiler failure: go on eagerly, say so
            self.model.load_state_dict(before)
            self.opt.state.clear()
            sums.zero_()
            self.compile = f"off (torch.compile failed: {type(e).__name__}: {str(e)[:200]})"
            self.log(f"{self.compile}; training eagerly")
            self._loss_fn, self._eval_fn = self._losses, self._logits
            self.step(idx, sums)

    # an epoch --------------------------------------------------------------------------------
    def epoch(self, e: int) -> dict[str, Any]:
        """Train 0-based epoch ``e`` and evaluate; per-seed numbers (NaN for a seed whose loss
        turned NaN/inf: it is reset to its initial state and left out from then on)."""
        cfg = self.cfg
        lr, beta1 = schedule(cfg, e)
        for group in self.opt.param_groups:
            group["lr"], group["betas"] = lr, (beta1, cfg.beta2)
        perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.orders])
        perms = perms.to(self.device, non_blocking=True)
        sums = torch.zeros(2, len(self.seeds), dtype=torch.float64, device=self.device)
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        for s in range(self.steps):
            idx = perms[:, s * self.batch:(s + 1) * self.batch]
            (self.first_step if e == 0 and s == 0 else self.step)(idx, sums)
        loss_sum, wrong = sums.tolist()  # the epoch's one wait for the device
        seconds = time.perf_counter() - t0
        seen = self.steps * self.batch
        train_loss = [x / seen for x in loss_sum]
        diverged = [i for i, x in enumerate(train_loss) if self.alive[i] and not math.isfinite(x)]
        for i in diverged:
            self.alive[i] = False
            self._reset(i)
        t1 = time.perf_counter()
        test_loss, test_err = self.evaluate()
        return {"lr": lr, "beta1": beta1, "seconds": seconds,
                "eval_seconds": time.perf_counter() - t1, "train_loss": train_loss,
                "train_error": [w / seen for w in wrong], "test_loss": test_loss,
                "test_error": test_err, "diverged": diverged}

    def evaluate(self) -> tuple[list[float], list[float]]:
        """Per-seed mean loss and error on the test set (eval mode; one wait at the end)."""
        s = len(self.seeds)
        sums = torch.zeros(2, s, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for i in range(0, self.x_test.shape[0], self.cfg.eval_batch_size):
                x = self.x_test[i:i + self.cfg.eval_batch_size]
                y = self.y_test[i:i + self.cfg.eval_batch_size][:, None].expand(-1, s)
                logits = self._eval_logits(self._inputs(x.expand(s, *x.shape)))
                loss = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").sum(0)
                sums += torch.stack([loss.double(), (logits.argmax(-1) != y).sum(0).double()])
        self.model.train()
        n = max(self.x_test.shape[0], 1)
        loss, wrong = sums.tolist()
        return [x / n for x in loss], [w / n for w in wrong]

    def _eval_logits(self, x: Tensor) -> Tensor:
        if self._eval_fn is self._logits:
            return self._logits(x)
        try:
            return self._eval_fn(x)
        except Exception as e:  # noqa: BLE001 - as in first_step: go on eagerly, say so
            self.log(f"torch.compile failed for evaluation ({type(e).__name__}: "
                     f"{str(e)[:200]}); evaluating eagerly")
            self._eval_fn = self._logits
            self.compile += " (evaluation eager: its compilation failed)"
            return self._logits(x)

    def _reset(self, i: int) -> None:
        """Seed ``i``'s share of every parameter, buffer and Adam moment back to the start, so
        that its NaNs cannot reach a shared check or reduction; it is no longer reported."""
        s = len(self.seeds)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dim() > 0 and s > 1:
                    v.chunk(s)[i].copy_(self.initial[k].chunk(s)[i])
                elif s == 1:
                    v.copy_(self.initial[k])
            for st in self.opt.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        (st[key].chunk(s)[i] if s > 1 else st[key]).zero_()


def _mode(compile_mode: str) -> str | None:
    return None if compile_mode == "default" else compile_mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- one process
def train_stack(cfgs: list[GPUConfig], data: ImageData, *, overwrite: bool = False,
                echo: bool = True) -> list[Path]:
    """Train one variant's seeds ``cfgs`` as one stack; one run folder per seed.

    Raises:
        WnormError: a bad setting, or a run folder already holds a run (before any is
            touched).
    """
    cfgs = [resolved(c) for c in cfgs]
    for c in cfgs:
        check_gpu(c)
    base = cfgs[0]
    paths = [Path(c.out) / run_dir_name(c) for c in cfgs]
    refuse_existing(paths, overwrite)
    device = resolve_device(base.device)
    _set_backends(base, device)
    name = f"{base.variant} s{','.join(str(c.seed) for c in cfgs)}"
    t_start = time.perf_counter()
    lines: list[str] = []
    trainer = StackTrainer(cfgs, data, device, log=lines.append)
    autocast = torch.bfloat16 if base.bf16 else None
    extra = {"data": data.describe(), "world_size": 1, "stacked_seeds": trainer.seeds,
             "cudnn_benchmark": device.type == "cuda",
             "precision": precision_info(device, autocast=autocast,
                                         channels_last=bool(base.channels_last),
                                         compile=base.compile)}
    folders = [RunFolder(p, c, device, extra, echo=False, overwrite=True)
               for p, c in zip(paths, cfgs)]
    say = print if echo else (lambda *a, **k: None)
    try:
        for f in folders:
            f.log(f"{f.path.name}: {data.name} {trainer.n} train / {data.x_test.shape[0]} "
                  f"test, width {base.width}, {base.epochs} epochs, device {device}, trained "
                  f"as one network with seeds {trainer.seeds}")
            f.log(trainer.init_message)
        for e in range(base.epochs):
            r = trainer.epoch(e)
            for line in lines:  # a compile fallback: in every log, and in the configs
                for f in folders:
                    if f is not None:
                        f.log(line)
                        _update_config(f.path, {"precision": extra["precision"]
                                                | {"compile": trainer.compile}})
            lines.clear()
            for i, f in enumerate(folders):
                if f is None:
                    continue
                if i in r["diverged"]:
                    f.write({"epoch": e + 1, "diverged": True, "loss": str(r["train_loss"][i]),
                             "train_loss": None, "train_error": None, "test_loss": None,
                             "test_error": None, "seconds": r["seconds"], "eval_seconds": 0.0,
                             "lr": r["lr"], "beta1": r["beta1"]})
                    f.log(f"epoch {e + 1}/{base.epochs}: training loss became "
                          f"{r['train_loss'][i]} (lr {r['lr']:g}): diverged, stopping this run")
                    f.close()
                    folders[i] = None
                    continue
                row = {"epoch": e + 1, "train_loss": r["train_loss"][i],
                       "train_error": r["train_error"][i], "test_loss": r["test_loss"][i],
                       "test_error": r["test_error"][i], "seconds": r["seconds"],
                       "eval_seconds": r["eval_seconds"], "lr": r["lr"], "beta1": r["beta1"]}
                f.write(row)
                f.log(f"epoch {e + 1}/{base.epochs}  train loss {row['train_loss']:.4f} "
                      f"error {100 * row['train_error']:.2f}%  test loss "
                      f"{row['test_loss']:.4f} error {100 * row['test_error']:.2f}%  "
                      f"{r['seconds']:.1f}s (the stack)")
            alive = [i for i, f in enumerate(folders) if f is not None]
            say(f"[{time.strftime('%H:%M:%S')}] {name} epoch {e + 1}/{base.epochs}: train error "
                + "/".join(f"{100 * r['train_error'][i]:.2f}" for i in alive)
                + "% test error " + "/".join(f"{100 * r['test_error'][i]:.2f}" for i in alive)
                + f"%  {r['seconds']:.1f} s + {r['eval_seconds']:.1f} s eval", flush=True)
            if not alive:
                break
    finally:
        for f in folders:
            if f is not None:
                f.log(f"done in {time.perf_counter() - t_start:.0f} s (the stack, start-up and "
                      "compilation included)")
                f.close()
    return paths


def _update_config(folder: Path, fields: dict[str, Any]) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=2) + "\n")


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


def run_all(configs: list[GPUConfig], *, overwrite: bool = False) -> dict[str, Any]:
    """Train every config: stacks of seeds dealt round-robin to ``procs`` worker processes that
    run at once, each training its stacks one after the other (in this process when ``procs``
    is 1). Returns what ``harness.json`` records: wall times.

    Raises:
        WnormError: a run folder already holds a run (before anything trains), or a worker
            failed (naming it and its log).
    """
    refuse_existing([Path(c.out) / run_dir_name(c) for c in configs], overwrite)
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
                failed.append(f"the worker for {'; '.join(names)} exited with "
                              f"{proc.returncode} (see {logf.name})")
            elif os.path.getsize(logf.name) == 0:
                os.remove(logf.name)  # nothing went to stderr: no file to keep
        if failed:
            raise WnormError("; ".join(failed))
    return {"wall_s": time.perf_counter() - t0, "processes_at_once": procs,
            "stacks": [_job_name(st) for st in stacks]}


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


# --------------------------------------------------------------------------- timing
def time_variants(cfg: GPUConfig, variants: list[str], data: ImageData, *, modes: list[str],
                  steps: int, rounds: int, log: Any = print) -> dict[str, Any]:
    """Seconds per training epoch of each variant, one seed at the paper's batch, for each
    compile mode in ``modes``: every (variant, mode) is built and warmed up (compiled) first,
    then ``rounds`` rounds time ``steps`` steps of each in turn, the variants' order rotating
    from round to round, so no two share the device while timed and slow drift hits all.
    Ratios are taken within a round, then their median."""
    cfg = resolved(cfg)
    device = resolve_device(cfg.device)
    _set_backends(cfg, device)
    on_device = dataclasses.replace(data, x_train=data.x_train.to(device),
                                    y_train=data.y_train.to(device),
                                    x_test=data.x_test.to(device), y_test=data.y_test.to(device))
    trainers: dict[tuple[str, str], StackTrainer] = {}
    for mode in modes:
        for v in variants:
            c = dataclasses.replace(cfg, variant=v, seed=0, compile=mode, stack=1)
            t = StackTrainer([c], on_device, device, log=log)
            g = torch.Generator().manual_seed(1)
            t.timing_idx = torch.randperm(t.n, generator=g)[None].to(device)
            sums = torch.zeros(2, 1, dtype=torch.float64, device=device)
            t0 = time.perf_counter()
            for k in range(steps):  # warm-up: compilation and cuDNN's choices happen here
                (t.first_step if k == 0 else t.step)(_batch(t, k), sums)
            _sync(device)
            log(f"timing: {v} ({'eager' if mode == 'off' else 'compiled, ' + mode}) ready in "
                f"{time.perf_counter() - t0:.1f} s" + (f"; {t.compile}" if t.compile != mode
                                                      else ""))
            trainers[(v, mode)] = t
    per_step: dict[tuple[str, str], list[float]] = {k: [] for k in trainers}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            for mode in modes:
                t = trainers[(v, mode)]
                sums = torch.zeros(2, 1, dtype=torch.float64, device=device)
                _sync(device)
                t0 = time.perf_counter()
                for k in range(steps):
                    t.step(_batch(t, k + (r + 1) * steps), sums)
                _sync(device)
                per_step[(v, mode)].append((time.perf_counter() - t0) / steps)
    epoch_steps = max(1, data.x_train.shape[0] // min(cfg.batch_size, data.x_train.shape[0]))
    rows = {}
    for (v, mode), ts in per_step.items():
        base = per_step.get(("normal", mode))
        eager = per_step.get((v, "off"))
        rows[f"{v} | {mode}"] = {
            "variant": v, "compile": trainers[(v, mode)].compile,
            "step_s": statistics.median(ts), "epoch_s": statistics.median(ts) * epoch_steps,
            "vs_normal": _ratio(ts, base), "vs_eager": _ratio(ts, eager) if mode != "off"
            else None, "raw_step_s": ts}
    return {"rows": rows, "modes": modes, "variants": variants, "steps_per_block": steps,
            "rounds": rounds, "steps_per_epoch": epoch_steps, "batch_size": cfg.batch_size,
            "width": cfg.width, "device": str(device),
            "precision": precision_info(device, autocast=torch.bfloat16 if cfg.bf16 else None,
                                        channels_last=bool(cfg.channels_last),
                                        compile=",".join(modes))}


def _batch(t: StackTrainer, k: int) -> Tensor:
    n = t.timing_idx.shape[1] // t.batch
    j = k % n
    return t.timing_idx[:, j * t.batch:(j + 1) * t.batch]


def _ratio(ts: list[float], base: list[float] | None) -> dict[str, float] | None:
    """Median and quartiles of the per-round ratios ``ts[r] / base[r]``."""
    if not base:
        return None
    rs = sorted(a / b for a, b in zip(ts, base))
    q = lambda p: rs[min(len(rs) - 1, max(0, round(p * (len(rs) - 1))))]  # noqa: E731
    return {"median": statistics.median(rs), "q25": q(0.25), "q75": q(0.75)}


def timing_text(t: dict[str, Any], machine: str, command: str) -> str:
    """``timing.md``: the table of :func:`time_variants`'s numbers."""
    modes = t["modes"]
    compiled = [m for m in modes if m != "off"]
    head = ["variant"]
    for m in modes:
        name = "eager" if m == "off" else f"compiled ({m})"
        head += [f"{name} s/epoch", f"{name} vs normal"]
    head += [f"compiled ({m}) vs eager" for m in compiled if "off" in modes]
    lines = ["# Seconds per training epoch, each variant alone on the device", "",
             f"- Hardware: {machine}; arithmetic: {precision_text(t['precision'])}",
             f"- An epoch: {t['steps_per_epoch']} steps of batch {t['batch_size']} (width "
             f"{t['width']}), training only (forward, backward, Adam); each number is the median "
             f"over {t['rounds']} interleaved rounds of {t['steps_per_block']} steps (ratios: "
             "within a round, then the median, with the quartiles), after a warm-up of as many "
             "steps that includes compilation",
             f"- Generated by `{command}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in t["variants"]:
        cells = [v]
        for m in modes:
            r = t["rows"][f"{v} | {m}"]
            cells += [f"{r['epoch_s']:.3f}", _ratio_text(r["vs_normal"])]
        cells += [_ratio_text(t["rows"][f"{v} | {m}"]["vs_eager"]) for m in compiled
                  if "off" in modes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in modes:
        rows = {v: t["rows"][f"{v} | {m}"] for v in t["variants"]}
        if "batchnorm" in rows and "weightnorm" in rows and "normal" in rows:
            name = "eager" if m == "off" else f"compiled ({m})"
            lines.append(f"- {name}: batchnorm {_ratio_text(rows['batchnorm']['vs_normal'])} "
                         f"and weightnorm {_ratio_text(rows['weightnorm']['vs_normal'])} the "
                         "time of normal per epoch (the paper, on its 2016 GPU: batch norm "
                         "about 16% slower, weight norm not noticeably slower).")
        fallbacks = {r["compile"] for r in rows.values() if r["compile"] != m}
        if fallbacks:
            lines.append(f"- {', '.join(sorted(fallbacks))}")
    return "\n".join(lines) + "\n"


def _ratio_text(r: dict[str, float] | None) -> str:
    if r is None:
        return "n/a"
    return f"{r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})"


# --------------------------------------------------------------------------- command line
def _measured(configs: list[GPUConfig], p: dict[str, Any]) -> dict[str, Any]:
    """Per variant, from the run folders: median seconds per epoch (training, and with
    evaluation) over epochs 2 on, and per stacked step, beside the plan's."""
    out = {}
    for v in dict.fromkeys(c.variant for c in configs):
        c = next(c for c in configs if c.variant == v)
        rows = [r for r in read_jsonl(Path(c.out) / run_dir_name(c) / "metrics.jsonl")
                if not r.get("diverged")]
        rows = rows[1:] or rows  # epoch 1 holds the compilation
        if not rows:
            continue
        train = statistics.median(r["seconds"] for r in rows)
        epoch = statistics.median(r["seconds"] + r["eval_seconds"] for r in rows)
        planned = p["variants"].get(v, {})
        out[v] = {"step_ms": 1e3 * train / p["steps_per_epoch"], "epoch_s": epoch,
                  "planned_step_ms": planned.get("step_ms"),
                  "planned_epoch_s": planned.get("epoch_s")}
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace run folders that already hold a run (default: refuse them)")
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
        print(plan_text(plan(configs[0], tuple(variants))))
        return 0
    try:
        if args.timing:
            return _timing(configs[0], variants, args, command)
        sys.stdout.flush()
        result = run_all(configs, overwrite=args.overwrite)
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    base = resolved(configs[0])
    predicted = plan(base, tuple(variants), train=_count(out, configs, "train"),
                     test=_count(out, configs, "test"))
    result |= {"plan": predicted, "measured": _measured(configs, predicted),
               "command": command, "hardware": hardware(base.device)}
    (out / "harness.json").write_text(json.dumps(result, indent=2) + "\n")
    from .report import report

    md, png, text = report([out], out / "report", command=f"python -m experiments.report {out} "
                                                         f"--out {out / 'report'}")
    print(text)
    print(f"classify_gpu: {result['wall_s']:.0f} s in all (plan: {predicted['total_s']:.0f} s); "
          f"wrote {out / 'harness.json'}, {md} and {png}")
    for v, m in result["measured"].items():
        print(f"  {v}: {m['step_ms']:.2f} ms per stacked step (plan {m['planned_step_ms']:.2f}), "
              f"{m['epoch_s']:.2f} s per epoch (plan {m['planned_epoch_s']:.2f})")
    return 0


def _count(out: Path, configs: list[GPUConfig], split: str) -> int:
    """How many train/test examples the runs used (from a config.json)."""
    c = configs[0]
    data = json.loads((Path(c.out) / run_dir_name(c) / "config.json").read_text())["data"]
    return int(data[split])


def _timing(cfg: GPUConfig, variants: list[str], args: argparse.Namespace,
            command: str) -> int:
    out = Path(args.out)
    r = resolved(cfg)
    modes = ["off"] + ([r.compile] if r.compile != "off" else [])
    t = time_variants(cfg, variants, _load(cfg), modes=modes, steps=args.timing_steps,
                      rounds=args.timing_rounds)
    out.mkdir(parents=True, exist_ok=True)
    machine = hardware(r.device)
    (out / "timing.json").write_text(json.dumps(t | {"hardware": machine, "command": command},
                                                indent=2) + "\n")
    text = timing_text(t, machine, command)
    (out / "timing.md").write_text(text)
    print(text)
    print(f"wrote {out / 'timing.json'} and {out / 'timing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
