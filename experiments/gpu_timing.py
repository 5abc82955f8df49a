"""The timing mode of :mod:`experiments.classify_gpu`: seconds per training epoch of each
variant relative to normal, eager and compiled, each variant alone on the device while it is
timed; ``timing.json`` and ``timing.md``."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from .common import precision_info, precision_text, resolve_device
from .data import ImageData
from .stack_trainer import StackTrainer, resolved, set_backends, sync

__all__ = ["time_variants", "timing_text"]


def time_variants(cfg: Any, variants: list[str], data: ImageData, *, modes: list[str],
                  steps: int, rounds: int, log: Any = print) -> dict[str, Any]:
    """Seconds per training epoch of each variant, one seed at the paper's batch, for each
    compile mode in ``modes``: every (variant, mode) is built and warmed up (compiled) first,
    then ``rounds`` rounds time ``steps`` steps of each in turn, the variants' order rotating
    from round to round, so no two share the device while timed and slow drift hits all.
    Ratios are taken within a round, then their median."""
    cfg = resolved(cfg)
    device = resolve_device(cfg.device)
    set_backends(cfg, device)
    on_device = dataclasses.replace(data, x_train=data.x_train.to(device),
                                    y_train=data.y_train.to(device),
                                    x_test=data.x_test.to(device), y_test=data.y_test.to(device))
    trainers: dict[tuple[str, str], StackTrainer] = {}
    order = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(1))
    order = order[None].to(device)  # the examples every block steps through, in turn
    for mode in modes:
        for v in variants:
            c = dataclasses.replace(cfg, variant=v, seed=0, compile=mode, stack=1)
            t = StackTrainer([c], on_device, device, log=log)
            sums = torch.zeros(2, 1, dtype=torch.float64, device=device)
            t0 = time.perf_counter()
            for k in range(steps):  # warm-up: compilation and cuDNN's choices happen here
                (t.first_step if k == 0 else t.step)(_batch(order, t.batch, k), sums)
            sync(device)
            log(f"timing: {v} ({'eager' if mode == 'off' else 'compiled, ' + mode}) ready in "
                f"{time.perf_counter() - t0:.1f} s" + (f"; {t.compile}" if t.compile != mode
                                                      else ""))
            trainers[(v, mode)] = t
    per_step: dict[tuple[str, str], list[float]] = {k: [] for k in trainers}
    for r in range(rounds):
        turn = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in turn:
            for mode in modes:
                t = trainers[(v, mode)]
                sums = torch.zeros(2, 1, dtype=torch.float64, device=device)
                sync(device)
                t0 = time.perf_counter()
                for k in range(steps):
                    t.step(_batch(order, t.batch, k + (r + 1) * steps), sums)
                sync(device)
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


def _batch(order: Tensor, batch: int, k: int) -> Tensor:
    """The ``k``-th batch of indices ``(1, batch)`` from ``order``, around again at its end."""
    j = k % (order.shape[1] // batch)
    return order[:, j * batch:(j + 1) * batch]


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
