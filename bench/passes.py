"""What weight norm adds to the CPU MLP rows, in passes over the weights (a roofline estimate).

    python -m bench.passes --out results/bench/cpu/passes.md     # ~1 minute, 1 thread

The MLP 4 x 256's weights (0.76 MiB) are what weight norm works on. This measures, on one
thread, medians of interleaved repeats: one copy pass over all four weights (read + write, the
unit of memory traffic here) and one read pass; PyTorch's fused weight-norm kernels
(``torch._weight_norm`` forward, ``_weight_norm_interface_backward``) over the four layers, as
a number of copy passes; and, for each CPU MLP row, the plain and the wnorm step and the extra
time per step, split into the kernels' share and the rest (autograd nodes, the weight
property, the optimizer's extra g tensors: per-layer fixed costs, not bytes).

Then the same training rows through other ways of computing a weight-normalized Linear, all
trained with the same SGD: ``same kernels`` calls ``F.linear(x, torch._weight_norm(v, g, 0),
b)`` in a plain module (what is left without wnorm's property and generated forward),
``same kernels + hook`` adds the hook wnorm registers for exact second derivatives, and the
paper's own form, which scales the output instead of the weight, ``y = (x v^T) g/||v|| + b``:
``output-scaled`` with aten ops and autograd's derivative, ``output-scaled fn`` as one
``autograd.Function`` whose backward adds the norm's term to the matmul's gradient in place.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm.maps import _SecondOrder

from . import harness
from .cases import SIZES, cases, inputs, make_step
from .models import mlp

__all__ = ["measure", "render", "main", "FORMS", "formulation", "formulations"]

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


class _SameKernels(nn.Module):
    """A Linear computing its weight with ``torch._weight_norm`` in its own forward."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach()
        self.g = nn.Parameter(w.norm(dim=1, keepdim=True))
        self.v, self.b = nn.Parameter(w.clone()), nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, torch._weight_norm(self.v, self.g, 0), self.b)


class _SameKernelsExact(_SameKernels):
    """:class:`_SameKernels` with the hook wnorm registers on the kernel's node, which makes a
    backward that records a graph differentiate eq. 2 (the kernel's own double backward holds
    ``||v||`` constant): what wnorm computes, without its property and generated forward."""

    def forward(self, x: Tensor) -> Tensor:
        w = torch._weight_norm(self.v, self.g, 0)
        w.grad_fn.register_hook(_SecondOrder(self.v, self.g, 0))
        return F.linear(x, w, self.b)


class _OutputScaled(_SameKernels):
    """``y = (x v^T) g/||v|| + b`` with aten ops (autograd's derivative)."""

    def forward(self, x: Tensor) -> Tensor:
        s = self.g.view(-1) / torch.linalg.vector_norm(self.v, dim=1)
        return torch.addcmul(self.b, F.linear(x, self.v), s)


class _ScaledFn(torch.autograd.Function):
    """``(x v^T) g/||v|| + b``; backward: ``dv = (dy s)^T x - (ds g/||v||^3) v``, in place."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor, v: Tensor, b: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(v, dim=1)
        s = g.view(-1) / n
        t = F.linear(x, v)
        ctx.save_for_backward(x, v, n, s, t)
        return torch.addcmul(b, t, s)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, v, n, s, t = ctx.saved_tensors
        ds = (dy * t).sum(0)
        dt = dy * s
        dv = dt.t().mm(x).addcmul_(v, (ds * s / (n * n)).neg().unsqueeze(1))
        dx = dt.mm(v) if ctx.needs_input_grad[0] else None
        return dx, (ds / n).view(-1, 1), dv, dy.sum(0)


class _OutputScaledFn(_SameKernels):
    def forward(self, x: Tensor) -> Tensor:
        return _ScaledFn.apply(x, self.g, self.v, self.b)


#: the ways of computing a weight-normalized Linear compared on the MLP rows
FORMS = {"same kernels": _SameKernels, "same kernels + hook": _SameKernelsExact,
         "output-scaled": _OutputScaled,
         "output-scaled fn": _OutputScaledFn}


def formulation(form: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The benchmark MLP ("plain", "wnorm" or one of :data:`FORMS`), seeded as bench's."""
    torch.manual_seed(0)
    net = mlp(SIZES["cpu"].mlp_width, 4).to(dtype)
    if form == "wnorm":
        return wnorm.apply(net)
    if form != "plain":
        for i, m in enumerate(net):
            if isinstance(m, nn.Linear):
                net[i] = FORMS[form](m)
    return net


def formulations(*, calls: int = 25, rounds: int = 15,
                 rows: tuple[str, ...] = ("mlp4x256.train.sgd.b1", "mlp4x256.train.sgd.b32")
                 ) -> dict[str, dict[str, float]]:
    """Seconds per training step of each form, per row (the same SGD and batch as bench's)."""
    by_name = {c.name: c for c in cases("cpu", SIZES["cpu"])}
    out = {}
    for name in rows:
        x, y = inputs(by_name[name], SIZES["cpu"], "cpu")
        steps = {}
        for form in ("plain", "wnorm", *FORMS):
            net = formulation(form).train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

            def step(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()

            steps[form] = step
        out[name] = _interleaved(steps, calls, rounds)
    return out


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
        "composed_backward": lambda: [_composed_backward(a, v, s, n)
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
    forms = formulations(calls=max(1, calls // 4), rounds=rounds,
                         rows=tuple(r for r in rows if ".train.sgd.b" in r))
    return {"weights_bytes": sum(v.numel() * v.element_size() for v in vs),
            "kernels_s": kernels, "rows": steps, "forms": forms,
            "threads": torch.get_num_threads(), "loadavg": harness.loadavg()}


def _composed_backward(dw: Tensor, v: Tensor, g: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient ``_weight_norm_interface_backward`` gives, from aten ops."""
    s = (dw * v).sum(1, keepdim=True)
    a = g / n
    return dw.mul(a).addcmul_(v, s * (-a / (n * n))), s / n


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
        f"{k['wn_backward'] / copy:.2f} copy passes (the same gradient from aten ops: "
        f"{k['composed_backward'] * us:.1f} us)", "",
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
    if m.get("forms"):
        names = ["wnorm", *FORMS]
        lines += ["", "Other ways to compute a weight-normalized Linear, the same training rows "
                  "(SGD with momentum), ratio to plain:", "",
                  "| row | plain | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for name, t in m["forms"].items():
            lines.append(f"| {name} | {t['plain'] * us:.0f} us | "
                         + " | ".join(f"{t[f] / t['plain']:.3f}" for f in names) + " |")
        lines += ["", "`same kernels + hook` computes what wnorm computes: the hook on the fused "
                  "kernel's node makes a backward that records a graph (gradient penalties, "
                  "Hessian-vector products) differentiate eq. 2, where the kernel's own double "
                  "backward holds ||v|| constant. From it to `same kernels` is that hook's "
                  "cost (registered at every forward, called at every backward); from it to "
                  "`wnorm`, the cost of wnorm's weight property and generated forward."]
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
