r"""The plan of :mod:`experiments.classify_gpu`, before any measurement: predicted step, epoch
and run times from FLOPs counted by torch's FlopCounterMode and activations counted by forward
hooks (both on the meta device: shapes only), and assumed rates.

.. math::
    t_\text{step} = \frac{\text{FLOPs}}{r_\text{bf16}\,e_\text{conv}}
                  + \frac{\text{activation bytes} \times \text{passes}}{b\,e_\text{mem}}
                  + t_\text{overhead}
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import torch
from torch import Tensor, nn

from .nets import build

__all__ = ["counts", "plan", "plan_text"]


def counts(variant: str, width: float, in_channels: int = 1, size: int = 28
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


def plan(cfg: Any, variants: tuple[str, ...], assumptions: dict[str, float], train: int = 60000,
         test: int = 10000, seeds: int | None = None, in_channels: int = 1,
         size: int = 28) -> dict[str, Any]:
    """The predicted step, epoch and run times of a comparison (``cfg``: width, batch size,
    seeds per stack, processes, epochs) of ``seeds`` seeds per variant (default: one stack's)
    on ``train`` / ``test`` examples, from counted FLOPs and activation bytes and the rates and
    efficiencies in ``assumptions`` (see ``experiments.classify_gpu.PLAN``).

    A variant's seeds train in stacks of ``cfg.stack`` (the last one smaller), the stacks dealt
    to ``cfg.procs`` processes; every stack's GPU time counts (the processes time-slice one
    GPU). A row is one full stack of a variant.
    """
    a = assumptions
    seeds = cfg.stack if seeds is None else seeds
    s, b = min(cfg.stack, seeds), min(cfg.batch_size, train)  # a batch is at most the set
    sizes = [min(cfg.stack, seeds - i) for i in range(0, seeds, cfg.stack)]  # each stack's
    stacks = len(sizes) * len(variants)
    processes = min(cfg.procs, stacks)
    steps = max(1, train // b)
    rate = a["bf16_flops_per_s"] * a["conv_efficiency"]
    bw = a["bytes_per_s"] * a["memory_efficiency"]

    def epoch_s(flops: float, elems: float, k: int) -> tuple[float, float, float]:
        """(step s, epoch s, step bytes) of a stack of ``k`` seeds."""
        step_bytes = elems * b * k * a["bytes_per_element"] * a["activation_passes"]
        step = flops * b * k / rate + step_bytes / bw + a["overhead_ms_per_step"] / 1e3
        # evaluation: a forward pass (a third of a training step's FLOPs, two activation
        # passes) over the test set, for every seed of the stack
        eval_s = test * k * (flops / 3 / rate + elems * a["bytes_per_element"] * 2 / bw)
        return step, steps * step + eval_s, step_bytes

    rows, gpu_s, conv_s = {}, 0.0, 0.0
    for v in variants:
        flops, elems = counts(v, cfg.width, in_channels, size)
        step, epoch, step_bytes = epoch_s(flops, elems, s)
        rows[v] = {"gflop_per_step": flops * b * s / 1e9, "act_gb_per_step": step_bytes / 1e9,
                   "step_ms": 1e3 * step, "epoch_s": epoch, "run_s": cfg.epochs * epoch}
        for k in sizes:
            gpu_s += cfg.epochs * epoch_s(flops, elems, k)[1]
            conv_s += cfg.epochs * k * (steps * flops * b + test * flops / 3) \
                / a["bf16_flops_per_s"]
    total = gpu_s + a["startup_s"]
    # the convolution efficiency at which the whole run takes the budget: conv_s / efficiency
    # is the convolutions' time, the rest does not depend on it
    rest = total - conv_s / a["conv_efficiency"]
    break_even = conv_s / (a["budget_s"] - rest) if a["budget_s"] > rest else math.inf
    per_process = math.ceil(stacks / processes)  # stacks one process trains one after another
    return {"variants": rows, "steps_per_epoch": steps,
            "steps_per_process": per_process * cfg.epochs * steps, "epochs": cfg.epochs,
            "processes": processes, "seeds_per_process": s, "seeds": seeds, "stacks": stacks,
            "gpu_s": gpu_s, "total_s": total, "break_even_efficiency": break_even,
            "train": train, "test": test, "batch_size": b, "assumptions": dict(a)}


def plan_text(p: dict[str, Any]) -> str:
    """The plan as the reStructuredText block of ``experiments.classify_gpu``'s docstring."""
    rule = "=========== ========== ============ ======== ======== ======="
    lines = [rule, "variant     GFLOP/step act. GB/step step ms  epoch s  run s", rule]
    for v, r in p["variants"].items():
        lines.append(f"{v:<12}{r['gflop_per_step']:<11.1f}{r['act_gb_per_step']:<13.2f}"
                     f"{r['step_ms']:<9.2f}{r['epoch_s']:<9.2f}{r['run_s']:.1f}")
    lines += [rule, ""]
    a = p["assumptions"]
    stacks = p.get("stacks", p["processes"])
    per_variant = stacks // max(len(p["variants"]), 1)
    prose = (
        f"A step trains {p['seeds_per_process']} seeds at once (batch {p['batch_size']} each); "
        + (f"{per_variant} stacks per variant ({p['seeds']} seeds), {stacks} in all; "
           if per_variant > 1 else "")
        + f"{p['steps_per_epoch']} steps per epoch ({p['train']} images), {p['epochs']} epochs: "
        f"{p['steps_per_process']} steps per process, {p['processes']} processes at once, "
        "time-sliced on one GPU (no kernel of one runs beside another's, so their GPU times "
        f"add up). Predicted: {p['gpu_s']:.0f} s on the GPU + {a['startup_s']:.0f} s of "
        f"start-up and compilation = {p['total_s']:.0f} s ({p['total_s'] / 60:.1f} min). "
        f"Break-even: the {a['budget_s'] / 60:.0f}-minute budget holds while the convolutions "
        f"run at {100 * p['break_even_efficiency']:.0f}% or more of the bf16 rate (the plan "
        f"assumes {100 * a['conv_efficiency']:.0f}%).")
    return "\n".join(lines + textwrap.wrap(prose, 95))


if __name__ == "__main__":  # a library module: run as a command, it did nothing and exited 0
    raise SystemExit("experiments.gpu_plan is a part of python -m experiments.classify_gpu, "
                     "not a command of its own; run that (its --help lists the options)")
