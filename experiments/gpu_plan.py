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
         test: int = 10000) -> dict[str, Any]:
    """The predicted step, epoch and run times of a comparison (``cfg``: width, batch size,
    seeds per stack, epochs), from counted FLOPs and activation bytes and the rates and
    efficiencies in ``assumptions`` (see ``experiments.classify_gpu.PLAN``)."""
    a = assumptions
    s, b = cfg.stack, cfg.batch_size
    steps = max(1, train // b)  # a batch larger than the training set runs as one step
    rate = a["bf16_flops_per_s"] * a["conv_efficiency"]
    bw = a["bytes_per_s"] * a["memory_efficiency"]
    rows, gpu_s, conv_s = {}, 0.0, 0.0
    for v in variants:
        flops, elems = counts(v, cfg.width)
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
    """The plan as the reStructuredText block of ``experiments.classify_gpu``'s docstring."""
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


if __name__ == "__main__":  # a library module: run as a command, it did nothing and exited 0
    raise SystemExit("experiments.gpu_plan is a part of python -m experiments.classify_gpu, "
                     "not a command of its own; run that (its --help lists the options)")
