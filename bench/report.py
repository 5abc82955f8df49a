"""bench.json -> bench.md: one row per case, plain's cost, every variant's ratio, the target.

    python -m bench.report results/bench/cpu/bench.json     # re-render results/bench/cpu/bench.md
    python -m bench.report --summary results/bench          # results/bench/bench.md: every
                                                            # device folder's table, CUDA first
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .cases import VARIANTS

__all__ = ["render", "summary", "table", "line", "verdicts"]

#: columns after "wnorm" and its target: PyTorch's two weight norms first, beside wnorm's
OTHERS = VARIANTS[2:]

METHOD = """\
How these were measured: every variant of a row runs in one process, in blocks of calls
interleaved round by round (the order rotating), after warm-up calls; a variant's time is the
median over rounds of its block time per call, and its ratio is that median over plain's
median in the same row (1.000 = plain's cost). `wnorm IQR` is the interquartile range of
wnorm's per-round paired ratios: how much the ratio moved within the run. Every variant of a
training row trains with the same `torch.optim` optimizer as plain (`adam-fused` is
`Adam(fused=True)`). Weight-normalized variants: `wnorm` is `wnorm.apply(model)` (the drop-in
path); `torch-new` is `torch.nn.utils.parametrizations.weight_norm` and `torch-old`
`torch.nn.utils.weight_norm` on every Linear/Conv layer; `wn+meanonly` is `wnorm.apply` with a
`wnorm.MeanOnlyBatchNorm` after each conv/hidden linear; `batchnorm` is BatchNorm there.
`infer` rows are `model.eval()` under `no_grad`, no fold; `infer-cached` rows hold one
`wnorm.cached()` block over all timed calls (`torch.nn.utils.parametrize.cached()` for
torch-new). `data_init` rows: plain is one `no_grad` forward of the plain model on the same
batch, the others are `wnorm.data_init(model, batch)` in units of it. `memory` rows: peak
`torch.cuda.max_memory_allocated` of a training step (model, optimizer state, batch and
activations), ratio to plain. `.compile` rows: `torch.compile(model)`, ratio to compiled plain.
Targets are issue 16's; n/a: a batch norm (BatchNorm, mean-only) cannot train on a batch
of 1."""


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
        r = case.get("ratio", {}).get(variant)
        if r is not None:
            out.append((variant, r, target, r <= target))
    return out


def _plain_cell(c: dict[str, Any]) -> str:
    if "peak_bytes" in c:
        return f"{c['peak_bytes']['plain'] / 2**20:.0f} MiB"
    return _fmt_time(c["median_s"]["plain"])


def _cell(c: dict[str, Any], v: str) -> str:
    if v in c.get("not_applicable", {}):
        return "n/a"
    if v not in c.get("ratio", {}):
        return "–"
    s = f"{c['ratio'][v]:.3f}"
    if v != "wnorm" and v in c.get("targets", {}):
        s += f" (≤ {c['targets'][v]:.2f})"
    return s


def _spread(c: dict[str, Any]) -> str:
    p = c.get("paired_ratio", {}).get("wnorm")
    return f"{p['q25']:.3f}–{p['q75']:.3f}" if p else "–"


def table(data: dict[str, Any]) -> list[str]:
    """The markdown table of one run: a row per case."""
    lines = ["| case | plain | wnorm | target | " + " | ".join(OTHERS) + " | wnorm IQR | "
             "verdict |", "|---|---:|---:|---:|" + "---:|" * len(OTHERS) + "---:|---|"]
    for c in data["cases"]:
        tg = c.get("targets", {})
        tgt = f"≤ {tg['wnorm']:.2f}" if "wnorm" in tg else ""
        if "skipped" in c:
            lines.append(f"| {c['name']} | – | – | {tgt} | " + " | ".join("–" for _ in OTHERS)
                         + f" | – | skipped: {c['skipped']} |")
            continue
        vs = verdicts(c)
        if not vs:
            status = ""
        elif data["config"]["quick"]:  # tiny sizes and repeats: its ratios measure nothing
            status = "not judged (quick run)"
        elif any(not m for *_, m in vs):
            status = "MISS: " + ", ".join(f"{v} {r:.3f} > {t:.2f}" for v, r, t, m in vs if not m)
        else:
            status = "PASS"
        lines.append(f"| {c['name']} | {_plain_cell(c)} | {_cell(c, 'wnorm')} | {tgt} | "
                     + " | ".join(_cell(c, v) for v in OTHERS)
                     + f" | {_spread(c)} | {status} |")
    return lines


def _environment(data: dict[str, Any]) -> list[str]:
    env, cfg = data["environment"], data["config"]
    s = cfg["sizes"]
    dev = env["device"] + (f" ({env['cuda_device']}, CUDA {env['cuda_version']})"
                           if env.get("cuda_device") else "")
    tf32 = (f"TF32: matmul {env.get('cuda_matmul_allow_tf32')}, cuDNN "
            f"{env.get('cudnn_allow_tf32')}; cudnn.benchmark {env.get('cudnn_benchmark')}")
    dirty = (" (modified: " + ", ".join(f.split()[-1] for f in env["dirty_files"]) + ")"
             if env.get("dirty") else "")
    loads = [c["loadavg_before"][0] for c in data["cases"] if "loadavg_before" in c]
    load = (f"load average (1 min) {env['loadavg_start'][0]:.2f} at start, "
            f"{min(loads):.2f}–{max(loads):.2f} before the rows, "
            f"{env.get('loadavg_end', [math.nan])[0]:.2f} at end"
            if loads else f"load average at start {env['loadavg_start'][0]:.2f}")
    return [
        f"Command: `{cfg['command']}` ({env.get('wall_s', math.nan):.0f} s)  ",
        f"Mode: {'quick (smoke run, numbers not meaningful)' if cfg['quick'] else 'full'}; "
        f"{cfg['repeats']} interleaved rounds per row after {cfg['warmup']} warm-up call(s), "
        f"blocks of about {cfg['block_s'] * 1e3:.0f} ms.  ",
        f"Device: {dev}; CPU: {env['cpu_model']}, {env['cpu_affinity']} cores usable, torch "
        f"threads {env['torch_threads']}"
        + ("; denormals flushed to zero" if env.get("flush_denormal") else "")
        + f"; {tf32}; {load}.  ",
        f"torch {env['torch']}, Python {env['python']}, wnorm {env['wnorm_version']} at "
        f"{env['git_commit'][:10]}{dirty}, {env['date_utc']}.  ",
        f"Sizes: convnet width {s['conv_width']:g} x the paper's channels ("
        f"{cfg['conv_width_reason']}); MLP 4 x {s['mlp_width']}; HiFi-GAN V1 width "
        f"{s['hifi_width']:g} x 512 channels, `bA x S` = batch A of S output samples.",
    ]


class BadBench(Exception):
    """A bench.json that cannot be read: truncated, empty, or not the bench's."""


def load(path: Path) -> dict[str, Any]:
    """A bench.json, rendered once to check it holds what :func:`render` reads."""
    try:
        data = json.loads(path.read_text())
        render(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadBench(f"{path}: not a bench.json (truncated or corrupt: {e})") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise BadBench(f"{path}: not a bench.json written by python -m bench.run "
                       f"(missing or wrong {e!s}); rerun the bench") from None
    return data


def render(data: dict[str, Any]) -> str:
    """bench.md of one run: where and how it ran, the table, the method."""
    rows = data["config"]["rows"]
    return "\n".join([f"# wnorm benchmark: {rows.upper()} rows", "", *_environment(data), "",
                      *table(data), "", METHOD, ""])


def summary(folder: Path) -> str:
    """One document with the table of every ``<folder>/<device>/bench.json``, CUDA first."""
    runs = sorted(folder.glob("*/bench.json"), key=lambda p: (p.parent.name != "cuda", p))
    if not runs:
        raise SystemExit(f"{folder}: no */bench.json (run python -m bench.run first)")
    out = ["# wnorm benchmark", ""]
    for path in runs:
        data = load(path)
        # a folder holding only the torch.compile rows says so in its heading
        what = ", torch.compile rows" if data["config"].get("cases") == "*.compile" else ""
        out += [f"## {data['config']['rows'].upper()}{what}"
                f" ([{path.parent.name}/bench.json]({path.parent.name}/bench.json))", "",
                *_environment(data), "", *table(data), ""]
    missing = [d for d in ("cuda", "cpu") if not (folder / d / "bench.json").exists()]
    for d in missing:
        cmd, where = _COMMAND[d]
        out += [f"## {d.upper()}", "", f"Not run yet: `{cmd}`{where}.", ""]
    out += [METHOD, ""]
    return "\n".join(out)


_COMMAND = {"cuda": ("bash bench/gpu.sh OUT", " on a CUDA machine, then OUT/cuda/bench.json "
                     "copied to results/bench/cuda/"),
            "cpu": ("python -m bench.run --out results/bench/cpu", "")}


def line(c: dict[str, Any]) -> str:
    """One console line per finished case."""
    if "skipped" in c:
        return f"{c['name']:44s} skipped: {c['skipped']}"
    rs = "  ".join(f"{k} {v:.3f}" for k, v in c["ratio"].items() if k != "plain")
    return f"{c['name']:44s} plain {_plain_cell(c):>9s}  {rs}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a bench.json, or with --summary a results folder")
    p.add_argument("--summary", action="store_true",
                   help="write PATH/bench.md from every PATH/*/bench.json")
    p.add_argument("--out", type=Path, default=None, help="default: bench.md beside the json")
    a = p.parse_args(argv)
    try:
        if a.summary:
            out = a.out or a.path / "bench.md"
            text = summary(a.path)
        else:
            if not a.path.is_file():
                p.error(f"{a.path}: no such bench.json")
            out = a.out or a.path.with_name("bench.md")
            text = render(load(a.path))
    except BadBench as e:
        p.error(str(e))
    out.write_text(text)
    print(out)


if __name__ == "__main__":
    main()
