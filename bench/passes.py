"""What weight norm adds to the CPU MLP rows, in passes over the weights (a roofline estimate).

    python -m bench.passes --out results/bench/cpu/passes.md     # ~1 minute, 1 thread

The MLP 4 x 256's weights (0.76 MiB) are what weight norm works on. This measures, on one
thread, medians of interleaved repeats: one copy pass over all four weights (read + write, the
unit of memory traffic here) and one read pass; PyTorch's fused weight-norm kernels
(``torch._weight_norm`` forward, ``_weight_norm_interface_backward``) over the four layers, as
a number of copy passes; and, for each CPU MLP row, the plain and the wnorm step and the extra
time per step, split into the kernels' share and the rest (autograd nodes, the weight
property, the optimizer's extra g tensors: per-layer fixed costs, not bytes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import harness
from .cases import SIZES, cases, make_step

__all__ = ["measure", "render", "main"]

ROWS = ("mlp4x256.train.sgd.b1", "mlp4x256.train.sgd-fused.b1", "mlp4x256.train.adam-fused.b1",
        "mlp4x256.train.sgd.b32", "mlp4x256.train.sgd-fused.b32", "mlp4x256.train.adam-fused.b32",
        "mlp4x256.infer.b1", "mlp4x256.infer.b32")


def _interleaved(fns: dict[str, Callable[[], Any]], calls: int, rounds: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    raw: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            raw[k].append(harness.time_block(fn, calls, "cpu"))
    return {k: statistics.median(v) for k, v in raw.items()}


def measure(*, calls: int = 100, rounds: int = 15, rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    """The numbers :func:`render` prints; seconds are per call."""
    width = SIZES["cpu"].mlp_width
    shapes = [(width, width)] * 3 + [(10, width)]
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(s, generator=g) for s in shapes]
    gs = [v.norm(dim=1, keepdim=True) for v in vs]
    outs = [torch.empty_like(v) for v in vs]
    grads = [torch.randn(s, generator=g) for s in shapes]
    norms = [torch.ops.aten._weight_norm_interface(v, s, 0)[1] for v, s in zip(vs, gs)]
    kernels = _interleaved({
        "copy_pass": lambda: [o.copy_(v) for o, v in zip(outs, vs)],
        "read_pass": lambda: [v.sum() for v in vs],
        "wn_forward": lambda: [torch._weight_norm(v, s, 0) for v, s in zip(vs, gs)],
        "wn_backward": lambda: [torch.ops.aten._weight_norm_interface_backward(a, v, s, n, 0)
                                for a, v, s, n in zip(grads, vs, gs, norms)],
    }, calls, rounds)
    sizes = SIZES["cpu"]
    by_name = {c.name: c for c in cases("cpu", sizes)}
    steps = {}
    for name in rows:
        c = by_name[name]
        t = _interleaved({v: make_step(c, v, sizes, "cpu").fn for v in ("plain", "wnorm")},
                         max(1, calls // 4), rounds)
        wn = kernels["wn_forward"] + (kernels["wn_backward"] if c.kind == "train" else 0.0)
        steps[name] = {"plain_s": t["plain"], "wnorm_s": t["wnorm"],
                       "extra_s": t["wnorm"] - t["plain"], "wn_kernels_s": wn}
    return {"weights_bytes": sum(v.numel() * v.element_size() for v in vs),
            "kernels_s": kernels, "rows": steps, "threads": torch.get_num_threads(),
            "loadavg": harness.loadavg()}


def render(m: dict[str, Any], command: str = "python -m bench.passes") -> str:
    k, mib = m["kernels_s"], m["weights_bytes"] / 2**20
    copy = k["copy_pass"]
    us = 1e6
    lines = [
        "# Weight norm's extra work on the CPU MLP rows, in passes over the weights", "",
        f"Command: `{command}` ({m['threads']} thread; load average "
        f"{m['loadavg'][0]:.2f} at the end; medians of interleaved repeats).", "",
        f"- weights: {mib:.2f} MiB (MLP 4 x 256, fp32)",
        f"- one copy pass (read + write) over them: {copy * us:.1f} us "
        f"({2 * m['weights_bytes'] / copy / 1e9:.1f} GB/s); one read pass: "
        f"{k['read_pass'] * us:.1f} us ({m['weights_bytes'] / k['read_pass'] / 1e9:.1f} GB/s)",
        f"- `torch._weight_norm` forward, 4 layers: {k['wn_forward'] * us:.1f} us = "
        f"{k['wn_forward'] / copy:.2f} copy passes; backward: {k['wn_backward'] * us:.1f} us = "
        f"{k['wn_backward'] / copy:.2f} copy passes", "",
        "| row | plain | wnorm | ratio | extra per call | of which weight-norm kernels "
        "| rest | plain in copy passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in m["rows"].items():
        lines.append(
            f"| {name} | {r['plain_s'] * us:.0f} us | {r['wnorm_s'] * us:.0f} us | "
            f"{r['wnorm_s'] / r['plain_s']:.3f} | {r['extra_s'] * us:.0f} us | "
            f"{r['wn_kernels_s'] * us:.0f} us | {(r['extra_s'] - r['wn_kernels_s']) * us:.0f} us "
            f"| {r['plain_s'] / copy:.1f} |")
    train = [r["plain_s"] / copy for n, r in m["rows"].items() if ".train." in n]
    if train:
        # what a 1.10x target leaves, against what the two kernels alone cost
        lines += ["", f"A 1.10x training target leaves 10% of plain's step: "
                  f"{0.1 * min(train):.1f}-{0.1 * max(train):.1f} copy passes; weight norm's "
                  f"forward and backward kernels alone take "
                  f"{(k['wn_forward'] + k['wn_backward']) / copy:.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument("--calls", type=int, default=100, help="calls per timed block")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    if a.calls < 1 or a.rounds < 1:
        p.error(f"--calls and --rounds must be at least 1; got {a.calls}, {a.rounds}")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    command = "python -m bench.passes" + "".join(f" {x}" for x in (argv if argv is not None
                                                                   else sys.argv[1:]))
    text = render(measure(calls=a.calls, rounds=a.rounds), command)
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
