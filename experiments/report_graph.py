"""The graph experiment's report: ``report.md`` and ``graph.png`` from its run folders.

``python -m experiments.graph --report-only --out results/graph`` runs it; see
:mod:`experiments.graph` for the experiment and the run folders it writes.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .common import (RunRecord, check_out, mean_std_range as _ms, read_jsonl, run_folders,
                     setting_key)
from .graph import MODELS, VARIANTS, GraphConfig

__all__ = ["report", "existing_runs", "refuse_mixed", "TARGET_FRACTION"]

TARGET_FRACTION = 0.9  # "epochs to" this fraction of the lowest mean best validation accuracy


class _Run(RunRecord):
    """A graph run folder: config, version and its metrics rows (one per epoch)."""

    @property
    def diverged(self) -> bool:
        return any(r.get("diverged") for r in self.metrics)

    @property
    def finished(self) -> bool:
        """Trained every epoch of its config (not diverged, not stopped half-way)."""
        return not self.diverged and self.metrics[-1].get("epoch") == self.config["epochs"]

    def curve(self, key: str) -> list[float]:
        return [r[key] for r in self.metrics if not r.get("diverged")]

    def best(self) -> dict[str, Any]:
        """The epoch of the best validation accuracy (the first, among ties)."""
        ok = [r for r in self.metrics if not r.get("diverged")]
        return max(ok, key=lambda r: (r["val_acc"], -r["epoch"]))

    def seconds_per_epoch(self) -> float:
        timed = [r for r in self.metrics if "seconds" in r]
        return timed[-1]["seconds"] / timed[-1]["epoch"] if timed else math.nan


#: the options that may differ between the runs of one comparison (they do not change what
#: is trained, or they are what is compared)
_PER_RUN = frozenset({"variant", "seed", "out", "threads", "device", "data_dir", "log_every"})


def _setting(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What must agree between the runs of one model in one report: the options but
    :data:`_PER_RUN`."""
    return setting_key({f.name: config.get(f.name) for f in fields(GraphConfig)}, _PER_RUN)


def refuse_mixed(runs: list[tuple[dict[str, Any], Path]]) -> None:
    """Refuse two runs of one model with different settings (one report would average them).

    Raises:
        WnormError: naming both folders and the options that differ.
    """
    first: dict[str, tuple[dict[str, Any], Path]] = {}
    for config, folder in runs:
        model = config["model"]
        if model not in first:
            first[model] = (config, folder)
        elif _setting(config) != _setting(first[model][0]):
            other, where = first[model]
            differ = [f"--{f.name.replace('_', '-')} {other.get(f.name)} vs "
                      f"{config.get(f.name)}" for f in fields(GraphConfig)
                      if f.name not in _PER_RUN and other.get(f.name) != config.get(f.name)]
            raise WnormError(f"graph: {where} and {folder} are {model} runs with different "
                             f"settings ({', '.join(differ)}); use another --out for one of "
                             "them")


def existing_runs(out: Path) -> list[_Run]:
    """The graph run folders already in ``out`` (none if it does not exist)."""
    if not out.is_dir():
        return []
    found = []
    for folder in run_folders([out], "graph"):
        run = _Run.read(folder)
        if run.config.get("experiment") == "graph":
            found.append(run)
    return found


def _load_runs(paths: list[Path]) -> list[_Run]:
    runs = []
    for folder in run_folders(paths, "graph report"):
        run = _Run.read(folder)
        if run.config.get("experiment") != "graph":
            continue
        if not run.metrics:
            raise WnormError(f"graph report: {folder} has no metrics (an unfinished run?); "
                             "finish or remove it")
        runs.append(run)
    if not runs:
        raise WnormError(f"graph report: no graph run folders in {', '.join(map(str, paths))}")
    seen: dict[tuple[str, str, int], Path] = {}
    for r in runs:
        key = (r.config["model"], r.config["variant"], r.config["seed"])
        if key in seen:
            raise WnormError(f"graph report: {seen[key]} and {r.folder} are both {key}; report "
                             "one of them")
        seen[key] = r.folder
    return runs


def _first_epoch(curve: list[float], target: float) -> float:
    """The first epoch (1-based) at which ``curve`` reaches ``target``; NaN if it never does."""
    return next((i + 1.0 for i, v in enumerate(curve) if v >= target), math.nan)


def _reached(values: list[float], digits: int = 1) -> str:
    """:func:`_ms` over the seeds that reached the target, saying how many did not."""
    missed = sum(math.isnan(v) for v in values)
    if missed == len(values):
        return f"not reached ({missed}/{len(values)} seeds)"
    return _ms(values, digits) + (f"; {missed}/{len(values)} seeds never" if missed else "")


def _paired(base: dict[int, float], other: dict[int, float], higher_better: bool,
            digits: int) -> tuple[str, str]:
    """The per-seed difference other - base (``mean ± std``, seeds better) and a verdict."""
    seeds = [s for s in sorted(set(base) & set(other))
             if not (math.isnan(other[s]) or math.isnan(base[s]))]
    diffs = [other[s] - base[s] for s in seeds]
    if not diffs:
        return "n/a", "no seed measured on both sides"
    better = sum((d > 0) == higher_better and d != 0 for d in diffs)
    worse = sum((d < 0) == higher_better and d != 0 for d in diffs)
    m = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    left = len(set(base) | set(other)) - len(diffs)
    text = (f"{m:+.{digits}f}" + (f" ± {sd:.{digits}f}" if not math.isnan(sd) else "")
            + f" ({better}/{len(diffs)} seeds better"
            + (f"; {left} seed(s) not measured on both sides" if left else "") + ")")
    b = [base[s] for s in seeds]
    o = [other[s] for s in seeds]
    apart = max(o) < min(b) or max(b) < min(o)
    if len(diffs) < 2:
        verdict = "one seed: no spread to judge by"
    elif better == len(diffs) and apart:
        verdict = "better on every seed, the seed ranges apart"
    elif worse == len(diffs) and apart:
        verdict = "worse on every seed, the seed ranges apart"
    elif better == len(diffs):
        verdict = "better on every seed, but the seed ranges overlap"
    elif worse == len(diffs):
        verdict = "worse on every seed, but the seed ranges overlap"
    elif better == worse == 0:
        verdict = "tied on every seed: no difference measured"
    elif worse == 0 or better == 0:  # the rest are ties (epoch counts are integers)
        some = better or worse
        verdict = (f"{'better' if worse == 0 else 'worse'} on {some} seed{'s' * (some > 1)}, "
                   f"tied on {len(diffs) - some}: within noise")
    else:
        verdict = "mixed across seeds: within noise"
    return text, verdict


def _chance_note(groups: dict[str, dict[str, list[_Run]]]) -> str:
    """How often chance alone puts a variant on one side of normal on every seed."""
    by_n: dict[int, list[str]] = defaultdict(list)
    for model, by_variant in groups.items():
        if by_variant:
            by_n[min(len(rs) for rs in by_variant.values())].append(model.upper())
    said = [f"with {n} seeds ({', '.join(models)}), {2 * 0.5 ** n:.0%} of the time"
            for n, models in sorted(by_n.items(), reverse=True)]
    return ("A variant with no real effect comes out on the same side of normal on every seed "
            f"(either side) {'; '.join(said)}; the seed ranges lying apart is the stronger "
            "sign.")


def _answer(rows: list[tuple[str, str, str]]) -> str:
    """One sentence from ``(variant, paired difference, verdict)`` rows: the variants that are
    better or worse than normal on every seed, and those within noise, each with its spread."""
    def listed(rs: list[tuple[str, str, str]]) -> str:
        return ", ".join(f"{v} {t.split(' (')[0]}" for v, t, _ in rs)

    better = [r for r in rows if r[2].startswith("better on every seed")]
    worse = [r for r in rows if r[2].startswith("worse on every seed")]
    rest = [r for r in rows if r not in better and r not in worse]
    parts = []
    for group, word in ((better, "better than normal on every seed"),
                        (worse, "worse than normal on every seed")):
        if group:
            apart = [v for v, _, verdict in group if "apart" in verdict]
            how = ("the seed ranges apart" if len(apart) == len(group) else
                   "the seed ranges overlapping" if not apart else
                   f"the seed ranges apart for {', '.join(apart)} only")
            parts.append(f"{word}: {listed(group)} ({how})")
    if rest:
        each = ", ".join(f"{v} {t.split(' (')[0]} ({verdict.split(':')[0]})"
                         for v, t, verdict in rest)
        parts.append(("no variant differs from normal beyond the seed-to-seed noise"
                      if len(rest) == len(rows) else "within noise") + f": {each}")
    return "; ".join(parts) + "."


def _plot(groups: dict[str, dict[str, list[_Run]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"normal": "tab:gray", "normal-init": "tab:green", "weightnorm": "tab:blue",
              "weightnorm-init": "tab:orange"}
    models = [m for m in groups if groups[m]]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for variant, runs in groups[model].items():
            for col, key, scale in ((0, "train_loss", 1.0), (1, "val_acc", 100.0)):
                curves = [[scale * v for v in r.curve(key)] for r in runs]
                n = min(len(c) for c in curves)
                cols = [[c[i] for c in curves] for i in range(n)]
                x = list(range(1, n + 1))
                mean = [statistics.fmean(c) for c in cols]
                ax = axes[row][col]
                ax.plot(x, mean, color=colors.get(variant), label=f"{variant} ({len(runs)} "
                                                                   "seeds)")
                ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols],
                                color=colors.get(variant), alpha=0.18, linewidth=0)
        axes[row][0].set(title=f"{model.upper()}: training loss (labelled nodes, dropout on)",
                         xlabel="epoch (one full-batch step)", yscale="log")
        axes[row][1].set(title=f"{model.upper()}: validation accuracy (%)",
                         xlabel="epoch (log scale: the first epochs are where they differ)",
                         xscale="log")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=8, loc="lower right")
    fig.suptitle("mean over seeds; band: min to max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _sessions(out: Path, runs: list[_Run]) -> list[dict[str, Any]]:
    """The invocations in ``out/sessions.jsonl`` that made at least one of ``runs`` (a run
    trained again with ``--overwrite`` belongs to the later invocation only)."""
    rows = read_jsonl(out / "sessions.jsonl")
    latest = {name: i for i, s in enumerate(rows) for name in s.get("run_names", [])}
    present = {r.folder.name for r in runs}
    return [s for i, s in enumerate(rows)
            if any(latest.get(n) == i and n in present for n in s.get("run_names", []))]


def report(paths: list[Path], out: Path) -> str:
    """``out/report.md`` and ``out/graph.png`` from the graph run folders in ``paths``;
    returns the markdown.

    Raises:
        WnormError: no graph run folder, one without metrics, or two for one (model, variant,
            seed).
    """
    out = check_out(out, "the report")
    runs = _load_runs(paths)
    # the numbers and curves come from the finished runs; the others are counted
    groups: dict[str, dict[str, list[_Run]]] = defaultdict(lambda: defaultdict(list))
    left_out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (MODELS.index(r.config["model"]),
                                         VARIANTS.index(r.config["variant"]),
                                         r.config["seed"])):
        key = (r.config["model"], r.config["variant"])
        if r.finished:
            groups[key[0]][key[1]].append(r)
        else:
            left_out[key].append(f"seed {r.config['seed']} "
                                 + ("diverged" if r.diverged else "unfinished"))
    refuse_mixed([(r.config, r.folder) for r in runs])
    for (model, variant), why in left_out.items():
        if not groups[model][variant]:
            del groups[model][variant]
    if not any(groups.values()):
        raise WnormError(f"graph report: no finished run in {', '.join(map(str, paths))} "
                         f"({'; '.join(w for ws in left_out.values() for w in ws)})")
    out.mkdir(parents=True, exist_ok=True)
    _plot(groups, out / "graph.png")
    first = runs[0]
    info = first.config["graph"]
    lines = [
        "# Weight normalization on graph networks: a kNN graph of Fashion-MNIST",
        "",
        f"Generated by `python -m experiments.graph --report-only --out {out}` from the run "
        "folders' metrics.jsonl; '± x' is the standard deviation over seeds, '(a to b)' the "
        "range.",
        "",
        f"- Graph: {info['nodes']} Fashion-MNIST training images as nodes "
        f"({info['data']['source']}); features: {info['features_from']}; each node joined to "
        f"its {first.config['k']} nearest neighbours (Euclidean, in feature space), "
        f"undirected: {info['edges_undirected']} edges, mean degree "
        f"{info['degree_mean']:.1f} (max {info['degree_max']}); "
        f"{100 * info['edge_homophily']:.1f}% of the edges join two images of the same class.",
        f"- Split (per seed): {first.config['split']['train']} labelled nodes "
        f"({first.config['labels_per_class']} per class), {first.config['split']['val']} "
        f"validation, {first.config['split']['test']} test.",
        "- Variants: `normal` (torch_geometric's init), `normal-init` (the same weights "
        "rescaled by the paper's data-dependent init, then plain again), `weightnorm` "
        "(`wnorm.apply`, same starting function as normal), `weightnorm-init` (`wnorm.apply` + "
        "`wnorm.data_init(model, (x, edge_index))`). Same seed: same split, same starting "
        "weights, same dropout draws.",
    ]
    for s in _sessions(out, runs):
        lines.append(f"- Ran `{s['command']}`: {s['runs']} runs in {s['wall_s']:.0f} s wall, "
                     f"{s['cpu_s']:.0f} s CPU, machine load average "
                     f"{s['load_average_1min'][0]:.1f} -> {s['load_average_1min'][1]:.1f} on "
                     f"{s['cpus']} CPUs.")
    code: dict[str, list[str]] = defaultdict(list)  # code version -> the models run with it
    for r in sorted(runs, key=lambda r: MODELS.index(r.config["model"])):
        v = r.version
        key = (f"{v.get('hardware')}; wnorm {v.get('wnorm')}, torch {v.get('torch')}, git "
               f"{str(v.get('git_commit'))[:10]}" + (" (dirty)" if v.get("git_dirty") else ""))
        if r.config["model"].upper() not in code[key]:
            code[key].append(r.config["model"].upper())
    for key, models in code.items():
        lines.append(f"- Hardware and code ({', '.join(models)}): {key}")
    sections: list[str] = []
    answers: list[str] = []
    short: dict[tuple[str, str], str] = {}  # (model, variant) -> the overview table's cell
    summary = ["| model | variant | measure | variant - normal, per seed | verdict |",
               "|---|---|---|---|---|"]
    for model, by_variant in groups.items():
        if not by_variant:
            continue
        cfg = next(iter(by_variant.values()))[0].config
        setting = {k: cfg[k] for k in ("hidden", "heads", "dropout", "lr", "weight_decay",
                                       "epochs", "pca", "k") if model == "gat" or k != "heads"}
        # the convergence target: on the steep part of every variant's curve (a target near
        # the plateau is reached or not by the plateau's noise)
        best_means = [statistics.fmean(100 * r.best()["val_acc"] for r in rs)
                      for rs in by_variant.values()]
        target = float(math.floor(TARGET_FRACTION * min(best_means)))
        early = min(20, min(len(r.curve("train_loss")) for rs in by_variant.values()
                            for r in rs))
        sections.append(f"## {model.upper()}")
        lines += ["", sections[-1], "",
                  "- Settings: " + ", ".join(f"{k} {v}" for k, v in setting.items())
                  + "; Adam, full batch (one step per epoch)",
                  f"- Epochs to {target:.0f}% validation accuracy: {target:.0f}% is "
                  f"{TARGET_FRACTION:.0%} of the lowest variant's mean best validation accuracy, "
                  "rounded down.",
                  "",
                  f"| variant | seeds | test acc % at best val epoch | best val acc % | "
                  f"final test acc % | epochs to {target:.0f}% val | train loss at epoch "
                  f"{early} | final train loss | best val epoch | s / epoch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        measures: dict[str, dict[str, dict[int, float]]] = {}
        for variant, rs in by_variant.items():
            m = {
                "test": {r.config["seed"]: 100 * r.best()["test_acc"] for r in rs},
                "bestval": {r.config["seed"]: 100 * r.best()["val_acc"] for r in rs},
                "final": {r.config["seed"]: 100 * r.curve("test_acc")[-1] for r in rs},
                "reach": {r.config["seed"]: _first_epoch([100 * v for v in r.curve("val_acc")],
                                                         target) for r in rs},
                "early": {r.config["seed"]: r.curve("train_loss")[early - 1] for r in rs},
                "last": {r.config["seed"]: r.curve("train_loss")[-1] for r in rs},
                "bestep": {r.config["seed"]: float(r.best()["epoch"]) for r in rs},
            }
            measures[variant] = m
            short[model, variant] = (f"{_ms(list(m['test'].values()), 1).split(' (')[0]} / "
                                     f"{_ms(list(m['early'].values()), 3).split(' (')[0]}")
            gone = left_out.get((model, variant))
            note = f" (left out: {', '.join(gone)})" if gone else ""
            sec = statistics.fmean(r.seconds_per_epoch() for r in rs)
            lines.append(
                f"| {variant}{note} | {len(rs)} | {_ms(list(m['test'].values()))} | "
                f"{_ms(list(m['bestval'].values()))} | {_ms(list(m['final'].values()))} | "
                f"{_reached(list(m['reach'].values()))} | {_ms(list(m['early'].values()), 3)} | "
                f"{_ms(list(m['last'].values()), 4)} | {_ms(list(m['bestep'].values()), 0)} | "
                f"{1000 * sec:.0f} ms |")
        for variant in VARIANTS:
            if (model, variant) in left_out and variant not in by_variant:
                lines.append(f"| {variant} (left out: {', '.join(left_out[model, variant])}) "
                             "| 0 |" + " n/a |" * 8)
        if "normal" not in measures:
            continue
        lines += ["", "Against `normal`, seed by seed (variant - normal):", "",
                  f"| variant | test acc at best val (points) | epochs to {target:.0f}% val | "
                  f"train loss at epoch {early} |", "|---|---|---|---|"]
        found: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for variant, m in measures.items():
            if variant == "normal":
                continue
            base = measures["normal"]
            cells = []
            for key, higher, digits, what in (
                    ("test", True, 2, "test accuracy at the best validation epoch"),
                    ("reach", False, 1, f"epochs to {target:.0f}% validation accuracy"),
                    ("early", False, 3, f"training loss at epoch {early}")):
                text, verdict = _paired(base[key], m[key], higher, digits)
                cells.append(f"{text}: {verdict}")
                summary.append(f"| {model.upper()} | {variant} | {what} | {text} | {verdict} |")
                found[what].append((variant, text, verdict))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        said = [f"**{model.upper()}, {what}** (variant - normal): {_answer(rows)}"
                for what, rows in found.items()]
        answers += [f"- {a}" for a in said]
        lines += [""] + [f"- {a}" for a in said]
    cut = lines.index(sections[0]) if sections else len(lines)
    head = lines[:cut]
    shown = [v for v in VARIANTS if any((m, v) in short for m in groups)]
    overview = ["| model (seeds) | " + " | ".join(shown) + " |",
                "|---|" + "---|" * len(shown)]
    for model, by_variant in groups.items():
        if by_variant:
            seeds = min(len(rs) for rs in by_variant.values())
            overview.append(f"| {model.upper()} ({seeds}) | "
                            + " | ".join(short.get((model, v), "n/a") for v in shown) + " |")
    early_note = sorted({line.split("train loss at epoch ")[1].split(" |")[0]
                         for line in lines if line.startswith("| variant | seeds |")})
    head += ["Test accuracy (%) at the best validation epoch / training loss at epoch "
             f"{', '.join(early_note)}, mean ± std over seeds:", ""] + overview + [""]
    text = "\n".join(head + ["![training loss and validation accuracy](graph.png)", "",
                             "## What the data say (each variant against normal, paired by seed)",
                             "", _chance_note(groups), ""] + answers + ["", "## Summary", ""]
                     + summary + [""] + lines[cut:]) + "\n"
    (out / "report.md").write_text(text)
    return text
