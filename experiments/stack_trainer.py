"""Training a variant's seeds as one network on one device, without waiting for it: the
trainer behind :mod:`experiments.classify_gpu` and :mod:`experiments.demo`.

A config here is an ``experiments.classify_gpu.GPUConfig``: :class:`experiments.classify.Config`
plus ``compile``, ``bf16``, ``channels_last``, ``tf32``, ``stack`` and ``procs``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import wnorm
from wnorm import WnormError

from .classify import check, run_dir_name, schedule
from .common import (RunFolder, batch_that_runs, precision_info, progress, refuse_existing,
                     resolve_device)
from .data import ImageData
from .nets import build, initialize
from .seed_stack import STACKABLE, draw_ahead, seed_streams, stack, stack_inputs

__all__ = ["COMPILE_MODES", "StackTrainer", "check_gpu", "resolved", "set_backends", "sync",
           "train_stack"]

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


def resolved(cfg: Any) -> Any:
    """``cfg`` with every ``auto``/``None`` made explicit for its device
    (``GPUConfig.resolved``: device, compile mode, bf16, channels-last and classify's own)."""
    return cfg.resolved()


def check_gpu(cfg: Any) -> None:
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
    if cfg.progress and cfg.procs > 1:
        raise WnormError(f"--progress draws a bar per epoch in this process, and --procs "
                         f"{cfg.procs} trains in worker processes (their stderr goes to "
                         "worker-*.log); pass --procs 1 with --progress")


def set_backends(cfg: Any, device: torch.device) -> None:
    """TF32 as ``cfg.tf32`` asks, cuDNN's autotuner on (fixed shapes), the thread count, and
    room for one compiled graph per model when one process compiles several."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.compile != "off":
        from torch._dynamo import config

        for name in ("recompile_limit", "cache_size_limit"):  # the newer name, the older
            if hasattr(config, name):
                setattr(config, name, max(64, getattr(config, name)))
                break


class StackTrainer:
    """One variant's seeds (``cfgs``, same settings but the seed) as one network on ``device``,
    with the data already there: :meth:`epoch` trains one epoch and returns its numbers.

    The steps never wait for the device; the only waits are one per epoch (its losses and
    errors) and those of :func:`wnorm.data_init` at the start.
    """

    def __init__(self, cfgs: list[Any], data: ImageData, device: torch.device,
                 log: Any = print) -> None:
        cfg = cfgs[0]
        self.cfg, self.device, self.log = cfg, device, log
        self.seeds = [c.seed for c in cfgs]
        s = len(cfgs)
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.n = self.x_train.shape[0]
        nets = []
        # each seed's noise and dropout from its own generator on the device, in the state
        # experiments.classify leaves the global one in for that seed: for the data init, as
        # after building its network (a CPU's generator drew the weights; a GPU's is fresh)
        self.streams = [torch.Generator(device=device) for _ in cfgs]
        for c, g in zip(cfgs, self.streams):  # each seed's network as classify builds it
            torch.manual_seed(c.seed)
            nets.append(build(c.variant, data.in_channels, c.width, noise=c.noise,
                              dropout=c.dropout))
            if device.type == "cpu":
                g.set_state(torch.get_rng_state())
            else:
                g.manual_seed(c.seed)
        model = seed_streams(nets[0], self.streams) if s == 1 else stack(nets, self.streams)
        self.model = model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the same data order per seed as experiments.classify (a host generator per seed)
        self.orders = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        init = torch.stack([torch.randperm(self.n, generator=g)[:cfg.init_examples]
                            for g in self.orders]).to(device)
        self.init_message = initialize(self.model, self._inputs(self.x_train[init]),
                                       cfg.init_scale)
        for c, g in zip(cfgs, self.streams):  # training's noise and dropout, as classify's
            g.manual_seed(c.seed * 1000 + 1)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # fused: one kernel for every tensor, and its step counts stay on the device (the
        # default keeps them on the host and reads them every step)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        if cfg.variant == "forced":  # v back on its sphere after every step, row by row
            wnorm.project_after_step(self.opt, self.model)
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

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.bf16))

    def _logits(self, x: Tensor) -> Tensor:
        with self._autocast():
            out = self.model(x)
        return out.float().reshape(x.shape[0], len(self.seeds), -1)

    def _draw_ahead(self, x: Tensor) -> None:
        """The next forward's noise and dropout, drawn eagerly under its autocast: the compiled
        loss is then one graph (:func:`~experiments.seed_stack.draw_ahead`)."""
        with self._autocast():
            draw_ahead(self.model, x)

    def _record(self, x: Tensor) -> None:
        """One eager forward on ``x`` in which the noise and dropout layers record their
        inputs; it moves running means and generators, which the caller puts back. Before
        the first compiled step, so that it already reads drawn-ahead numbers: compiled while
        recording, its graph would keep a break at every such layer."""
        self._draw_ahead(x)
        with torch.no_grad():
            self._logits(x)

    def _put_back(self, state: dict[str, Tensor], drawn: list[Tensor]) -> None:
        """Parameters, buffers and generators as they were when ``state``/``drawn`` were taken."""
        self.model.load_state_dict(state)
        for g, at in zip(self.streams, drawn):
            g.set_state(at)

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
        self._draw_ahead(x)
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
        drawn = [g.get_state() for g in self.streams]
        self._record(self._inputs(self.x_train[idx]))
        self._put_back(before, drawn)  # the recording forward leaves no trace
        try:
            self.step(idx, sums)
        except Exception as e:  # noqa: BLE001 - any compiler failure: go on eagerly, say so
            self._put_back(before, drawn)  # the eager step draws the same numbers
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
        sync(self.device)
        t0 = time.perf_counter()
        desc = f"{cfg.variant} s{','.join(map(str, self.seeds))} {e + 1}/{cfg.epochs}"
        with progress(self.steps, desc, bool(cfg.progress)) as bar:
            for s in range(self.steps):
                idx = perms[:, s * self.batch:(s + 1) * self.batch]
                (self.first_step if e == 0 and s == 0 else self.step)(idx, sums)
                if bar is not None:
                    bar.update(1)  # a count: no wait for the device
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_stack(cfgs: list[Any], data: ImageData, *, overwrite: bool = False,
                echo: bool = True) -> list[Path]:
    """Train one variant's seeds ``cfgs`` as one stack; one run folder per seed.

    Raises:
        WnormError: a bad setting, or a run folder already holds a run (before any is
            touched).
    """
    cfgs = [batch_that_runs(resolved(c), data.x_train.shape[0]) for c in cfgs]
    for c in cfgs:
        check_gpu(c)
    base = cfgs[0]
    paths = [Path(c.out) / run_dir_name(c) for c in cfgs]
    refuse_existing(paths, overwrite)
    device = resolve_device(base.device)
    set_backends(base, device)
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
    ended = False  # Ctrl-C or a crash leaves the runs unfinished: --resume trains them again
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
                    f.finish()  # a diverged run is a result: --resume keeps it
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
        ended = True
    finally:
        for f in folders:
            if f is not None:
                f.log(f"{'done' if ended else 'stopped'} in {time.perf_counter() - t_start:.0f}"
                      " s (the stack, start-up and compilation included)")
                if ended:
                    f.finish()
                else:
                    f.close()
    return paths


def _update_config(folder: Path, fields: dict[str, Any]) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=2) + "\n")
