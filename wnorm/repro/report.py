"""Run folders -> ``training_error.png`` (Figure 1's form) and ``report.md`` (Table 1's form).

Usage::

    python -m wnorm.repro report runs/fashion runs/more/fashion-mnist-normal-s3 --out results/

Each argument is a run folder (it holds ``config.json``) or a folder of run folders. Runs are
grouped by setting (dataset, epochs, width, subsets, batch size, lr) and by variant; every
number in the outputs is computed here from ``metrics.jsonl``, ``config.json`` and
``version.json``:

- the plot: training error (and test error) per epoch, mean over seeds, min-max band;
- the table: final test error, mean ± std over seeds (n), with the paper's CIFAR-10 Table 1
  figure beside it; final training error; seconds per training epoch relative to ``normal``
  (epoch 1 left out when there are more, it includes warm-up); and epochs to reach a training
  error of X%, X being ``--target-error`` or by default the lowest training error that every
  variant's seed-mean curve reaches (rounded up to 0.5%), so the column compares all variants.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .models import VARIANTS

__all__ = ["Run", "load_runs", "report", "is_sweep", "PAPER_TABLE1"]

#: The paper's Table 1 (CIFAR-10 test error %, no augmentation); meanonly is approximate.
PAPER_TABLE1: dict[str, tuple[float, bool]] = {
    "normal": (8.43, False),
    "weightnorm": (8.46, False),
    "batchnorm": (8.05, False),
    "wn+meanonly": (7.31, False),
    "meanonly": (8.52, True),
}
_SETTING = ("dataset", "epochs", "width", "train_subset", "test_subset", "batch_size", "lr")


@dataclass
class Run:
    folder: Path
    config: dict[str, Any]
    version: dict[str, Any]
    metrics: list[dict[str, float]]

    @property
    def variant(self) -> str:
        return str(self.config["variant"])

    @property
    def complete(self) -> bool:
        return len(self.metrics) >= int(self.config["epochs"])

    @property
    def setting(self) -> tuple[Any, ...]:
        return tuple(self.config.get(k) for k in _SETTING)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it does not exist); a bad line names its place."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise WnormError(f"{path}:{i}: not a JSON line ({e})") from e
    return rows


def read_run_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, version, metrics)`` of a run folder, whatever experiment wrote it."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WnormError(f"{folder}: config.json is not readable JSON ({e})") from e
    vpath = folder / "version.json"
    version = json.loads(vpath.read_text()) if vpath.is_file() else {}
    return config, version, read_jsonl(folder / "metrics.jsonl")


def _read_run(folder: Path) -> Run:
    return Run(folder, *read_run_files(folder))


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run folder named in ``paths`` or directly inside one of them.

    Raises:
        WnormError: a path does not exist, or no run folder (with ``config.json``) was found.
    """
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise WnormError(f"report: {p} does not exist")
        if (p / "config.json").is_file():
            runs.append(_read_run(p))
        else:
            runs.extend(_read_run(d) for d in sorted(p.iterdir()) if (d / "config.json").is_file())
    if not runs:
        raise WnormError(f"report: no run folder (a folder with config.json) in {list(map(str, paths))}")
    runs = [r for r in runs if r.metrics]
    if not runs:
        raise WnormError(f"report: the run folders in {list(map(str, paths))} have no metrics yet")
    return runs


def is_sweep(paths: list[str | Path]) -> bool:
    """Whether the run folders in ``paths`` are learning-rate sweep runs (``"kind": "lr-sweep"``).

    Raises:
        WnormError: a path does not exist, or sweep and classification runs are mixed.
    """
    kinds = set()
    for p in map(Path, paths):
        if not p.exists():
            raise WnormError(f"report: {p} does not exist")
        folders = [p] if (p / "config.json").is_file() else sorted(
            d for d in p.iterdir() if (d / "config.json").is_file())
        for d in folders:
            try:
                kinds.add(json.loads((d / "config.json").read_text()).get("kind", "classify"))
            except (OSError, json.JSONDecodeError) as e:
                raise WnormError(f"{d}: config.json is not readable JSON ({e})") from e
    if len(kinds) > 1:
        raise WnormError(f"report: the folders mix run kinds {sorted(kinds)}; report them "
                         "separately")
    return kinds == {"lr-sweep"}


# --------------------------------------------------------------------------- numbers
def _order(variants: list[str]) -> list[str]:
    known = [v for v in VARIANTS if v in variants]
    return known + sorted(v for v in variants if v not in VARIANTS)


def _mean_curve(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs present in every run, and the mean/min/max of ``key`` (in %) over the runs."""
    length = min(len(r.metrics) for r in runs)
    epochs = [int(runs[0].metrics[i]["epoch"]) for i in range(length)]
    vals = [[100 * r.metrics[i][key] for r in runs] for i in range(length)]
    return epochs, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _epochs_to(run: Run, target: float) -> int | None:
    for m in run.metrics:
        if 100 * m["train_error"] <= target + 1e-9:
            return int(m["epoch"])
    return None


def _sec_per_epoch(run: Run) -> float:
    secs = [m["seconds"] for m in run.metrics]
    return statistics.fmean(secs[1:] if len(secs) > 1 else secs)


def _default_target(by_variant: dict[str, list[Run]]) -> float:
    worst_best = max(min(_mean_curve(rs, "train_error")[1]) for rs in by_variant.values())
    return math.ceil(worst_best * 2 - 1e-9) / 2


def _beta1(c: dict[str, Any]) -> str:
    early, late = c.get("beta1", "?"), c.get("beta1_late", "?")
    return f"{early} throughout" if early == late else f"{early} then {late}"


def _fmt(mean: float, values: list[float]) -> str:
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


# --------------------------------------------------------------------------- outputs
def _table(setting: tuple[Any, ...], by_variant: dict[str, list[Run]], target: float,
           command: str) -> str:
    cfg = dict(zip(_SETTING, setting))
    any_run = next(iter(by_variant.values()))[0]
    c = any_run.config
    data = c.get("data", {})
    hardware = sorted({r.version.get("hardware", "?") for rs in by_variant.values() for r in rs})
    commits = sorted({(r.version.get("git_commit") or "?")[:10]
                      + ("+dirty" if r.version.get("git_dirty") else "")
                      for rs in by_variant.values() for r in rs})
    lines = [
        f"### {cfg['dataset']}: {cfg['epochs']} epochs, width {cfg['width']}, "
        f"{data.get('train', '?')} train / {data.get('test', '?')} test examples",
        "",
        f"- Data: {data.get('source', '?')}; preprocessing {data.get('preprocessing', '?')}; "
        f"train subset {cfg['train_subset'] or 'full'}, test subset {cfg['test_subset'] or 'full'}",
        f"- Training: batch {cfg['batch_size']}, Adam lr {cfg['lr']} constant for "
        f"{c.get('decay_start', '?')} epochs then linear to 0; beta1 {_beta1(c)}; data init on "
        f"{c.get('init_examples', '?')} examples",
        f"- Hardware: {'; '.join(hardware)}",
        f"- Time: {sum(len(rs) for rs in by_variant.values())} runs, "
        f"{sum(m.get('seconds', 0.0) + m.get('eval_seconds', 0.0) for rs in by_variant.values() for r in rs for m in r.metrics) / 60:.0f}"  # noqa: E501
        " minutes of training and evaluation in all (the sum over runs and epochs)",
        f"- Code: wnorm {any_run.version.get('wnorm', '?')}, torch "
        f"{any_run.version.get('torch', '?')}, git {', '.join(commits)}",
        f"- Generated by `{command}`",
        "",
    ]
    paper_note = "" if cfg["dataset"] == "cifar10" else " (CIFAR-10, full run; not this setting)"
    lines += [
        f"| variant | final test error % (mean ± std) | seeds | paper test error %{paper_note} "
        f"| final train error % | s/epoch vs normal | epochs to {target:g}% train error |",
        "|---|---|---|---|---|---|---|",
    ]
    normal_sec = (statistics.fmean(_sec_per_epoch(r) for r in by_variant["normal"])
                  if "normal" in by_variant else None)
    reach: dict[str, float | None] = {}
    missed: dict[str, tuple[int, int]] = {}  # variant -> (seeds that missed the target, seeds)
    for v in _order(list(by_variant)):
        rs = by_variant[v]
        test = [100 * r.metrics[-1]["test_error"] for r in rs]
        train = [100 * r.metrics[-1]["train_error"] for r in rs]
        incomplete = sum(not r.complete for r in rs)
        seeds = f"{len(rs)}" + (f" ({incomplete} incomplete)" if incomplete else "")
        paper = PAPER_TABLE1.get(v)
        paper_txt = "" if paper is None else f"{paper[0]:.2f}" + (" (approx.)" if paper[1] else "")
        sec = statistics.fmean(_sec_per_epoch(r) for r in rs)
        rel = f"{sec / normal_sec:.2f}" if normal_sec else "n/a"
        hits = [_epochs_to(r, target) for r in rs]
        got = [h for h in hits if h is not None]
        missed[v] = (len(hits) - len(got), len(hits))
        if len(got) == len(hits):
            reach[v] = statistics.fmean(got)
            ep = f"{reach[v]:.1f}" if len(got) > 1 else f"{got[0]}"
            if len(got) > 1 and min(got) != max(got):
                ep += f" ({min(got)}-{max(got)})"
        else:
            reach[v] = None
            ep = f"not reached by {len(hits) - len(got)} of {len(hits)} seeds"
        lines.append(f"| {v} | {_fmt(statistics.fmean(test), test)} | {seeds} | {paper_txt} | "
                     f"{_fmt(statistics.fmean(train), train)} | {rel} ({sec:.2f} s) | {ep} |")
    lines.append("")
    if "normal" in reach:
        base = reach["normal"]
        for v, r in reach.items():
            if v == "normal":
                continue
            if r is None or base is None:  # some seed of one of them never got there
                verdict = (f"{_reached(v, r, *missed[v])}; "
                           f"{_reached('normal', base, *missed['normal'])}")
            else:
                cmp = "fewer" if r < base else ("more" if r > base else "as many")
                verdict = f"{v} took {_epochs(r)} epochs, normal {_epochs(base)}: {cmp} epochs"
            lines.append(f"- {target:g}% training error: {verdict}.")
        lines.append("")
    return "\n".join(lines)


def _reached(variant: str, epochs: float | None, missed: int, seeds: int) -> str:
    if epochs is None:
        return f"{variant} missed it with {missed} of {seeds} seeds"
    return f"{variant} reached it with every seed ({_epochs(epochs)} epochs on average)"


def _epochs(n: float) -> str:
    """An epoch count: whole numbers as they are, means to one decimal."""
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def _plot(groups: dict[tuple[Any, ...], dict[str, list[Run]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:orange",
                                 "tab:purple", "tab:brown", "tab:pink", "tab:olive")))
    for row, (setting, by_variant) in enumerate(groups.items()):
        cfg = dict(zip(_SETTING, setting))
        for col, key in enumerate(("train_error", "test_error")):
            ax = axes[row][col]
            for v in _order(list(by_variant)):
                rs = by_variant[v]
                ep, mean, lo, hi = _mean_curve(rs, key)
                c = colors.get(v)
                ax.plot(ep, mean, label=f"{v} (n={len(rs)})", color=c, marker="o", ms=3)
                if len(rs) > 1:
                    ax.fill_between(ep, lo, hi, color=c, alpha=0.2, linewidth=0)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
            ax.set_title(f"{cfg['dataset']}, width {cfg['width']}: {key.split('_')[0]} error "
                         f"(mean over seeds, min-max band)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def report(paths: list[str | Path], out: str | Path, *, target_error: float | None = None,
           command: str | None = None) -> tuple[Path, Path, str]:
    """Write ``report.md`` and ``training_error.png`` into ``out`` from the runs in ``paths``.

    Returns:
        ``(markdown path, png path, markdown text)``.

    Raises:
        WnormError: no usable run folder in ``paths``.
    """
    runs = load_runs(paths)
    groups: dict[tuple[Any, ...], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[r.setting][r.variant].append(r)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or ("python -m wnorm.repro report " + " ".join(map(str, paths))
                          + f" --out {out}")
    png = out / "training_error.png"
    _plot(groups, png)
    parts = ["# Weight normalization: the classification experiment (Salimans & Kingma 2016, "
             "section 5)", "", f"![training error]({png.name})", ""]
    for setting, by_variant in groups.items():
        target = target_error if target_error is not None else _default_target(by_variant)
        parts.append(_table(setting, by_variant, target, command))
    text = "\n".join(parts)
    md = out / "report.md"
    md.write_text(text)
    return md, png, text
