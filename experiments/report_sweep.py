r"""The learning-rate sweep's report: run folders -> ``final_loss_vs_lr.png``, ``v_norm.png`` and
``report.md`` (``python -m experiments.report RUNS --out DIR`` calls :func:`report_sweep`).

- ``final_loss_vs_lr.png``: final training loss vs learning rate, one line per variant, mean
  over seeds with a min-max band, diverged runs as X marks with their count;
- ``v_norm.png``: :math:`\lVert v\rVert` relative to step 1 over training, one line per learning
  rate, per weight-normalized variant;
- ``report.md``: the tables, and a sentence per variant computed from the runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .common import (RunRecord, check_out, read_jsonl, read_run_files, refuse_duplicates,
                     run_folders, setting_key)
from .nets import VARIANTS
from .report import VARIANT_COLORS

__all__ = ["SweepRun", "load_sweep", "report_sweep"]


_SWEEP_NOT_SETTING = frozenset({"variant", "lr", "seed", "out", "progress", "threads", "device",
                                "data_dir", "download"})


@dataclass
class SweepRun(RunRecord):
    """An lr-sweep run as read back from its folder, with its ``vnorm.jsonl`` rows."""

    vnorm: list[dict[str, Any]]

    @property
    def lr(self) -> float:
        return float(self.config["lr"])

    @property
    def complete(self) -> bool:
        return self.diverged or len(self.metrics) >= int(self.config["epochs"])

    @property
    def final_loss(self) -> float:
        """The last epoch's training loss; NaN for a diverged run."""
        if self.diverged or not self.metrics:
            return math.nan
        return float(self.metrics[-1]["train_loss"])

    @property
    def final_test_error(self) -> float:
        if self.diverged or not self.metrics:
            return math.nan
        return float(self.metrics[-1]["test_error"])

    def v_growth(self) -> tuple[list[int], list[float]]:
        r"""Steps and the mean over layers of :math:`\lVert v_t\rVert/\lVert v_1\rVert`."""
        if not self.vnorm:
            return [], []
        first = self.vnorm[0]["v_norm"]
        steps, ratios = [], []
        for row in self.vnorm:
            r = [row["v_norm"][k] / first[k] for k in first if first[k]]
            steps.append(int(row["step"]))
            ratios.append(sum(r) / len(r) if r and all(map(math.isfinite, r)) else math.nan)
        return steps, ratios

    @property
    def setting(self) -> tuple[Any, ...]:
        """The whole config but what varies within a sweep (variant, lr, seed) and what does
        not change the computation (out, progress, threads, device, data_dir, download)."""
        return setting_key(self.config, _SWEEP_NOT_SETTING)


def load_sweep(paths: list[str | Path]) -> list[SweepRun]:
    """The sweep run folders named in ``paths`` or directly inside them (at least one of them
    with metrics).

    Raises:
        WnormError: a folder is not a sweep run, none has metrics, or two are the same run.
    """
    folders = run_folders(paths)
    runs = []
    for d in folders:
        config, version, metrics = read_run_files(d)
        if config.get("kind") != "lr-sweep":
            raise WnormError(f"{d}: not an lr-sweep run folder (config kind "
                             f"{config.get('kind', 'classify')!r})")
        runs.append(SweepRun(d, config, version, metrics, read_jsonl(d / "vnorm.jsonl")))
    # a run with no metrics yet is kept: counted as incomplete in its cell, as the other
    # reports list it, not dropped so that its cell reads blank
    if not any(r.metrics for r in runs):
        raise WnormError(f"report: no lr-sweep run folder with metrics in {list(map(str, paths))}")
    refuse_duplicates(runs, lambda r: (r.variant, f"lr {r.lr:g}", f"seed {r.config.get('seed')}"),
                      "variant, learning rate and seed")
    return runs


def _variant_order(variants: Any) -> list[str]:
    known = [v for v in VARIANTS if v in variants]
    return known + sorted(v for v in variants if v not in VARIANTS)


Cell = dict[str, Any]  # lr -> {"finals": [...], "diverged": k, "n": n, "test": [...], ...}


def _cells(runs: list[SweepRun]) -> dict[str, dict[float, Cell]]:
    out: dict[str, dict[float, Cell]] = {}
    for r in runs:
        cell = out.setdefault(r.variant, {}).setdefault(
            r.lr, {"finals": [], "diverged": 0, "n": 0, "test": [], "growth": [],
                   "incomplete": 0, "steps": []})
        cell["n"] += 1
        if not r.complete:  # in progress or stopped early: counted, left out of the numbers
            cell["incomplete"] += 1
        elif r.diverged:
            cell["diverged"] += 1
            cell["steps"].append(r.metrics[-1].get("diverged_step"))
        else:
            cell["finals"].append(r.final_loss)
            cell["test"].append(r.final_test_error)
            ratios = [x for x in r.v_growth()[1] if math.isfinite(x)]
            if ratios:
                cell["growth"].append(ratios[-1])
    return out


def _good(cells: dict[float, Cell], tolerance: float) -> tuple[float | None, float | None,
                                                                  list[float]]:
    """(best mean final loss over the lrs no seed diverged at, its lr, lrs within tolerance)."""
    clean = {lr: statistics.fmean(c["finals"]) for lr, c in cells.items()
             if c["finals"] and not c["diverged"] and not c["incomplete"]}
    if not clean:
        return None, None, []
    best_lr = min(clean, key=clean.__getitem__)
    best = clean[best_lr]
    return best, best_lr, sorted(lr for lr, m in clean.items() if m <= best + tolerance)


def _summary(variant: str, cells: dict[float, Cell], tolerance: float) -> str:
    lrs = sorted(cells)
    best, best_lr, good = _good(cells, tolerance)
    div = [lr for lr in lrs if cells[lr]["diverged"]]
    parts = [f"**{variant}**:"]
    if best is None:
        if all(cells[lr]["diverged"] for lr in lrs):
            parts.append(f"diverged at every learning rate ({len(lrs)}).")
        else:
            n = sum(cells[lr]["incomplete"] for lr in lrs)
            parts.append(f"no learning rate with every seed complete and none diverged ("
                         f"{n} run{'' if n == 1 else 's'} incomplete).")
        return " ".join(parts)
    span = math.log10(max(good) / min(good)) if good else 0.0
    contiguous = good == [lr for lr in lrs if min(good) <= lr <= max(good)]
    parts.append(
        f"best final training loss {best:.3f} (lr {best_lr:g}); within {tolerance:g} of it at "
        f"{len(good)} of {len(lrs)} learning rates ({', '.join(f'{lr:g}' for lr in good)}: "
        f"{span:.1f} orders of magnitude{'' if contiguous else ', not contiguous'});")
    if div:
        parts.append(f"diverged (NaN/inf loss, some seed) at {len(div)} of {len(lrs)} "
                     f"({', '.join(f'{lr:g}' for lr in div)}).")
    else:
        parts.append("never diverged.")
    growth = {lr: statistics.fmean(cells[lr]["growth"]) for lr in lrs if cells[lr]["growth"]}
    if growth:
        lo, hi = min(growth), max(growth)
        at = f"x{growth[lo]:.3g} at lr {lo:g}"
        if hi != lo:
            at += f", x{growth[hi]:.3g} at lr {hi:g}"
        parts.append(f"Mean ||v|| at the end / at the start: {at} (the "
                     f"{'largest' if hi != lo else 'only'} lr with a run that did not diverge).")
    return " ".join(parts)


def _cell_text(c: Cell, key: str, scale: float = 1.0, digits: int = 3) -> str:
    vals = [scale * v for v in c[key] if math.isfinite(v)]
    if not vals:
        parts = [f"{what} ({c[what]}/{c['n']})" for what in ("diverged", "incomplete") if c[what]]
        return "; ".join(parts) or "n/a"
    txt = f"{statistics.fmean(vals):.{digits}f}"
    if len(vals) > 1:
        txt += f" ({min(vals):.{digits}f}-{max(vals):.{digits}f})"
    if c["diverged"]:
        txt += f"; diverged {c['diverged']}/{c['n']}"
    if c["incomplete"]:
        txt += f"; {c['incomplete']} incomplete"
    return txt


def _sweep_table(setting: tuple[Any, ...], runs: list[SweepRun], tolerance: float,
                 command: str) -> str:
    cfg = c = runs[0].config
    data = c.get("data", {})
    cells = _cells(runs)
    variants = _variant_order(cells)
    lrs = sorted({r.lr for r in runs})
    seeds = sorted({int(r.config["seed"]) for r in runs})
    hardware = sorted({r.version.get("hardware", "?") for r in runs})
    commits = sorted({(r.version.get("git_commit") or "?")[:10]
                      + ("+dirty" if r.version.get("git_dirty") else "") for r in runs})
    model = (f"MLP {data.get('shape', '?')} -> {cfg['depth']} x {cfg['hidden']} -> 10, leaky ReLU"
             if cfg["model"] == "mlp" else f"the section-5 convnet at width {cfg['width']} "
             "(no noise, no dropout)")
    opt = (f"SGD, momentum {cfg['momentum']}" if cfg["optimizer"] == "sgd" else "Adam (betas "
           "0.9, 0.999)")
    secs = [m["seconds"] for r in runs for m in r.metrics]
    lines = [
        f"### {cfg['dataset']}, {opt}, constant learning rate, {cfg['epochs']} epochs",
        "",
        f"- Model: {model}; the paper's data init on {c.get('init_examples', '?')} examples for "
        "every variant",
        f"- Data: {data.get('train', '?')} train / {data.get('test', '?')} test examples "
        f"({data.get('source', '?')}, {data.get('preprocessing', '?')}); batch {cfg['batch_size']}",
        f"- Runs: {len(runs)} = {len(variants)} variants x {len(lrs)} learning rates x "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); "
        f"{sum(secs):.0f} s of training steps "
        "in all",
        f"- Hardware: {'; '.join(hardware)}",
        f"- Code: wnorm {runs[0].version.get('wnorm', '?')}, torch "
        f"{runs[0].version.get('torch', '?')}, git {', '.join(commits)}",
        f"- Generated by `{command}`",
        "",
        "Per variant (a learning rate is good when no seed diverged and the seed-mean final "
        f"training loss is within {tolerance:g} nats of the variant's best):",
        "",
    ]
    lines += [f"- {_summary(v, cells[v], tolerance)}" for v in variants]
    scale = _v_scale(runs)
    if scale is not None:
        lines += ["", f"Where the curves sit: at the first step forced's ||v|| is x{scale:.3g} "
                  "weightnorm's (its v is held at sqrt(fan-in); weightnorm's starts at "
                  "0.05 sqrt(fan-in)), and the relative step on v scales as lr g/||v||^2, so at a "
                  f"given learning rate forced moves v about {scale ** 2:.3g} times less: its "
                  "curve is shifted to larger learning rates. Compare the widths of the good "
                  "ranges, not their positions."]
    lines += ["", "Final training loss (mean over seeds, min-max; mean of the last epoch's "
              "minibatch losses):", "",
              "| lr | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for lr in lrs:
        row = [_cell_text(cells[v][lr], "finals") if lr in cells[v] else "" for v in variants]
        lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
    lines += ["", "Final test error % (mean over seeds, min-max):", "",
              "| lr | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for lr in lrs:
        row = [_cell_text(cells[v][lr], "test", 100, 1) if lr in cells[v] else ""
               for v in variants]
        lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
    wn = [v for v in variants if any(cells[v][lr]["growth"] for lr in cells[v])]
    if wn:
        lines += ["", "Mean over layers of ||v|| at the end / at the first step (mean over seeds):",
                  "", "| lr | " + " | ".join(wn) + " |", "|---|" + "---|" * len(wn)]
        for lr in lrs:
            row = []
            for v in wn:
                cell = cells[v].get(lr)
                if cell is None:
                    row.append("")
                elif cell["growth"]:
                    row.append(f"{statistics.fmean(cell['growth']):.3g}")
                else:
                    row.append(_cell_text(cell, "growth"))
            lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def _v_scale(runs: list[SweepRun]) -> float | None:
    """Mean over (seed, lr) of forced's / weightnorm's mean ||v|| at step 1 (None if absent)."""
    first = {}
    for r in runs:
        if r.vnorm and r.variant in ("weightnorm", "forced"):
            v = r.vnorm[0]["v_norm"]
            first[(r.variant, r.lr, r.config["seed"])] = v
    ratios = []
    for (variant, lr, seed), v in first.items():
        w = first.get(("weightnorm", lr, seed)) if variant == "forced" else None
        if w:
            ratios += [v[k] / w[k] for k in v if w.get(k)]
    return statistics.fmean(ratios) if ratios else None


def _plot_loss(groups: dict[tuple[Any, ...], list[SweepRun]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 1, squeeze=False)
    for ax, (setting, runs) in zip(axes[:, 0], groups.items()):
        cfg = runs[0].config
        cells = _cells(runs)
        for i, v in enumerate(_variant_order(cells)):
            color = VARIANT_COLORS.get(v)
            lrs = sorted(cells[v])
            ok = [lr for lr in lrs if cells[v][lr]["finals"]]
            mean = [statistics.fmean(cells[v][lr]["finals"]) for lr in ok]
            lo = [min(cells[v][lr]["finals"]) for lr in ok]
            hi = [max(cells[v][lr]["finals"]) for lr in ok]
            n = max(c["n"] for c in cells[v].values())
            ax.plot(ok, mean, marker="o", color=color, label=f"{v} (n={n} seeds)")
            ax.fill_between(ok, lo, hi, color=color, alpha=0.2, linewidth=0)
            div = [lr for lr in lrs if cells[v][lr]["diverged"]]
            y = 0.96 - 0.05 * i  # axes fraction: the top strip, one row per variant
            ax.scatter(div, [y] * len(div), marker="X", s=90, color=color,
                       transform=ax.get_xaxis_transform(), zorder=5, clip_on=False)
            for lr in div:
                c = cells[v][lr]
                ax.annotate(f"{c['diverged']}/{c['n']}", (lr, y), xycoords=ax.get_xaxis_transform(),
                            xytext=(7, -3), textcoords="offset points", fontsize=7, color=color)
        ax.axhline(math.log(10), color="k", lw=0.8, ls="--")
        ax.text(0.01, math.log(10), " ln 10: a uniform guess", transform=ax.get_yaxis_transform(),
                va="bottom", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        all_lrs = [r.lr for r in runs]
        ax.set_xlim(min(all_lrs) / 1.6, max(all_lrs) * 2.5)  # diverged-only lrs stay in view
        ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the divergence strip
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final training loss")
        opt = (f"SGD momentum {cfg['momentum']}" if cfg["optimizer"] == "sgd" else "Adam")
        ax.set_title(f"{cfg['dataset']} {cfg['model']}, {opt}, {cfg['epochs']} epochs: final "
                     "training loss vs learning rate\n(mean over seeds, min-max band; X: "
                     "diverged (NaN/inf loss), k/n seeds)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], marker="X", color="k", ls="", ms=8))
        labels.append("diverged (NaN/inf)")
        ax.legend(handles, labels, fontsize=8, loc="center left")
    fig.savefig(path, dpi=110)


def _plot_vnorm(groups: dict[tuple[Any, ...], list[SweepRun]], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    panels = []
    for setting, runs in groups.items():
        for v in _variant_order({r.variant for r in runs if r.vnorm}):
            panels.append((setting, v, [r for r in runs if r.variant == v]))
    if not panels:
        return
    fig = Figure(figsize=(6 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    lows, highs = [0.9], [1.2]  # a flat line stays flat on screen
    all_lrs = sorted({r.lr for _, _, rs in panels for r in rs})
    norm = LogNorm(min(all_lrs), max(all_lrs))
    cmap = colormaps["viridis"]
    for ax, (setting, v, runs) in zip(axes, panels):
        cfg = runs[0].config
        by_lr: dict[float, list[SweepRun]] = {}
        for r in runs:
            by_lr.setdefault(r.lr, []).append(r)
        for lr in sorted(by_lr):
            curves = [r.v_growth() for r in by_lr[lr]]
            length = min(len(s) for s, _ in curves)
            if length == 0:
                continue
            steps = curves[0][0][:length]
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(length)]
            ax.plot(steps, mean, color=cmap(norm(lr)), lw=1.4)
            finite_mean = [m for m in mean if math.isfinite(m)]
            if finite_mean:
                lows.append(min(finite_mean) / 1.1)
                highs.append(max(finite_mean) * 1.1)
            if any(r.diverged for r in by_lr[lr]):
                finite = [(s, m) for s, m in zip(steps, mean) if math.isfinite(m)]
                if finite:
                    ax.scatter(*finite[-1], marker="X", color=cmap(norm(lr)), s=60, zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean over layers of ||v|| / ||v|| at step 1")
        ax.set_title(f"{v} ({cfg['model']}, {cfg['optimizer']}): ||v|| over training\n(mean over "
                     "seeds; X: a seed diverged after this point)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylim(min(lows), max(highs))
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label="learning rate")
    fig.savefig(path, dpi=110)


def report_sweep(paths: list[str | Path], out: str | Path, *, tolerance: float = 0.1,
                 command: str | None = None) -> tuple[Path, list[Path], str]:
    """Write ``report.md``, ``final_loss_vs_lr.png`` and ``v_norm.png`` into ``out`` from the
    sweep runs in ``paths``.

    Returns:
        ``(markdown path, [png paths], markdown text)``.

    Raises:
        WnormError: no sweep run folder in ``paths``, or a negative ``tolerance``.
    """
    if not tolerance >= 0:
        raise WnormError(f"report: tolerance must be >= 0; got {tolerance!r}")
    out = check_out(out, "the report")
    runs = load_sweep(paths)
    groups: dict[tuple[Any, ...], list[SweepRun]] = {}
    for r in runs:
        groups.setdefault(r.setting, []).append(r)
    out.mkdir(parents=True, exist_ok=True)
    command = command or ("python -m experiments.report " + " ".join(map(str, paths))
                          + f" --out {out}")
    loss_png, v_png = out / "final_loss_vs_lr.png", out / "v_norm.png"
    _plot_loss(groups, loss_png)
    _plot_vnorm(groups, v_png)
    pngs = [loss_png] + ([v_png] if v_png.is_file() else [])
    parts = ["# Learning-rate robustness of weight normalization (Salimans & Kingma 2016, "
             "section 2.1)", "",
             "Weight normalization's gradient is orthogonal to v, so under plain SGD ||v|| grows "
             "by sqrt(1 + C^2) per step and the effective step g/||v|| shrinks; forced weight "
             "normalization (EDM2) renormalizes v every step, which removes that mechanism.", "",
             f"![final training loss vs learning rate]({loss_png.name})", ""]
    if v_png.is_file():
        parts += [f"![||v|| over training]({v_png.name})", ""]
    parts += [_sweep_table(s, rs, tolerance, command) for s, rs in groups.items()]
    text = "\n".join(parts)
    md = out / "report.md"
    md.write_text(text)
    return md, pngs, text
