"""bench.json -> bench.md: one row per case, plain's time and every variant's ratio to it.

    python -m bench.report results/bench/bench.json [--out results/bench/bench.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .cases import VARIANTS


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def verdicts(case: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """``(variant, ratio, target, met)`` for every target of a case that was measured."""
    out = []
    for variant, target in case.get("targets", {}).items():
        r = case["ratio"].get(variant)
        if r is not None:
            out.append((variant, r, target, r <= target))
    return out


def render(data: dict[str, Any]) -> str:
    env, cfg = data["environment"], data["config"]
    lines = [
        "# wnorm benchmark",
        "",
        f"Command: `{cfg['command']}`  ",
        f"Mode: {'quick (smoke run, numbers not meaningful)' if cfg['quick'] else 'full'}; "
        f"{cfg['repeats']} interleaved repeats per case after {cfg['warmup']} warm-up calls, "
        f"blocks of about {cfg['block_s'] * 1e3:.0f} ms; times are medians per call, ratios are "
        "median(variant) / median(plain) of the same case.  ",
        f"Device: {env['device']}"
        + (f" ({env['cuda_device']})" if env.get("cuda_device") else "")
        + f"; CPU: {env['cpu_model']}, {env['cpu_affinity']} cores usable; torch threads "
        f"{env['torch_threads']} (interop {env['torch_interop_threads']})"
        + ("; denormals flushed to zero" if env.get("flush_denormal") else "") + "; "
        f"load average at start {env['loadavg_start'][0]:.2f}, at end "
        f"{env.get('loadavg_end', [math.nan])[0]:.2f} (the machine is shared: other processes "
        "slow every variant of a round alike, the ratios less than the times).  ",
        f"torch {env['torch']}, Python {env['python']}, wnorm {env['wnorm_version']} at "
        f"{env['git_commit'][:10]}{' (wnorm/ modified)' if env['wnorm_dirty'] else ''}, "
        f"{env['date_utc']}.  ",
        f"Convnet width: {cfg['conv_width']} x the paper's channels "
        f"({max(1, round(96 * cfg['conv_width']))}/{max(1, round(192 * cfg['conv_width']))}); "
        f"{cfg['conv_width_reason']}.",
        "",
        "| case | plain | wnorm | target | " + " | ".join(v for v in VARIANTS[2:]) + " | PASS/MISS |",
        "|---|---:|---:|---:|" + "---:|" * (len(VARIANTS) - 2) + "---|",
    ]
    for c in data["cases"]:
        ratio, tg = c["ratio"], c.get("targets", {})

        def cell(v: str) -> str:
            if v in c.get("not_applicable", {}):
                return "n/a"
            if v not in ratio:
                return "-"
            s = f"{ratio[v]:.3f}"
            if v != "wnorm" and v in tg:
                s += f" (<= {tg[v]:g})"
            return s

        vs = verdicts(c)
        status = "PASS" if vs and all(m for *_, m in vs) else "-"
        if any(not m for *_, m in vs):
            status = "MISS: " + ", ".join(f"{v} {r:.3f} > {t:g}" for v, r, t, m in vs if not m)
        name = c["name"] + (" (width %g)" % cfg["conv_width"] if c["model"] == "convnet" else "")
        tgt = f"<= {tg['wnorm']:g}" if "wnorm" in tg else ""
        lines.append(f"| {name} | {_fmt_time(c['median_s']['plain'])} | {cell('wnorm')} | {tgt} | "
                     + " | ".join(cell(v) for v in VARIANTS[2:]) + f" | {status} |")
    lines += [
        "",
        "data_init rows: `plain` is one no_grad forward pass of the plain model on the same batch; "
        "`wnorm` and `wn+meanonly` are `wnorm.data_init(model, batch)` on that variant, as a "
        "multiple of that forward pass.",
        "Training rows: `wnorm` and `wn+meanonly` train with `wnorm.optim.SGD`/`Adam` "
        "(optimizer-side weight norm: forward and backward run the layers as plain layers, and "
        "one C++ kernel per step applies eqs. 3-4 and the update to g and v); `wnorm-autograd` "
        "is the drop-in path, `wnorm.apply` trained with `torch.optim` (weight norm inside the "
        "autograd graph). `plain-fused` is the plain model with torch's `fused=True` optimizer, "
        "PyTorch's own one-kernel CPU step (`plain` uses torch's default per-parameter loop): "
        "wnorm's ratio against it is `wnorm / plain-fused`. Inference and data_init rows are "
        "the same model either way.",
        "`wn+meanonly` is weight norm with a `wnorm.MeanOnlyBatchNorm` after each conv and "
        "hidden linear (those layers without a bias), each pair fused by "
        "`wnorm.fuse_mean_only` (the batch mean subtracted as the layer's bias).",
        "`torch` is `torch.nn.utils.parametrizations.weight_norm` (recomputed on every access, "
        "also at inference). n/a: BatchNorm cannot train on a batch of 1.",
        "Noise: bench.json keeps every raw block time and, per variant, the quartiles of the "
        "per-round paired ratios.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: bench.md beside the json")
    a = p.parse_args(argv)
    data = json.loads(a.json.read_text())
    out = a.out or a.json.with_name("bench.md")
    out.write_text(render(data))
    print(out)


if __name__ == "__main__":
    main()
