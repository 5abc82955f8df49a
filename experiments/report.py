"""Run folders -> tables and plots: ``python -m experiments.report RUNS... --out DIR``.

Usage::

    python -m experiments.report runs/fashion runs/more/fashion-mnist-normal-s3 --out results/x
    python -m experiments.report results/lr-sweep/runs --out results/lr-sweep
    python -m experiments.report results/vae results/seq results/dqn results/dqn-no-init \
        --out results/others-report

The kind of run is read from each ``config.json``: learning-rate sweep runs go to
:mod:`experiments.report_sweep`, VAE/LSTM/DQN runs to :mod:`experiments.report_others`, and
classification runs (:mod:`experiments.classify`, :mod:`experiments.classify_gpu`,
:mod:`experiments.demo`) get ``training_error.png`` (Figure 1's form) and ``report.md`` (Table
1's form), written here.

Each argument is a run folder (it holds ``config.json``) or a folder of run folders (a folder
named twice counts once; two folders with the same variant and seed in one setting are refused).
Runs are grouped by setting, that is their whole ``config.json`` but ``variant``, ``seed``,
``out``, ``progress``, ``threads``, ``device``, ``data_dir`` and ``download`` (the data actually
used is in the config's ``data``), and by variant; every number in the outputs is computed here
from ``metrics.jsonl``, ``config.json`` and ``version.json``, and only from complete runs (all
the configured epochs written): runs still in progress or stopped early, and runs that
diverged (their last metrics line says ``"diverged": true``), are listed under the table and
left out of its numbers. A half-written last metrics line (a killed run) is ignored, which
leaves that run incomplete. Runs a time limit stopped before their last epoch can be compared
at an epoch they reached, ``--at-epoch N`` (the report then says so in bold).

- the plot: training error (and test error) per epoch, mean over seeds, min-max band;
- the table: final test error, mean ± std over seeds (n), with the paper's CIFAR-10 Table 1
  figure beside it; final training error; seconds per training epoch relative to ``normal``
  (epoch 1 left out when there are more, it includes warm-up); and epochs to reach a training
  error of X%, X being ``--target-error`` or by default the lowest training error that every
  variant's seed-mean curve reaches (rounded up to 0.5%), so the column compares all variants.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .common import (RunRecord, check_out, precision_text, refuse_duplicates, run_folders,
                     setting_key)
from .nets import VARIANTS

__all__ = ["Run", "load_runs", "report", "run_kind", "schedule_text", "PAPER_TABLE1",
           "VARIANT_COLORS", "main"]

#: The paper's Table 1 (CIFAR-10 test error %, no augmentation); meanonly is approximate.
PAPER_TABLE1: dict[str, tuple[float, bool]] = {
    "normal": (8.43, False),
    "weightnorm": (8.46, False),
    "batchnorm": (8.05, False),
    "wn+meanonly": (7.31, False),
    "meanonly": (8.52, True),
}
_SETTING = ("dataset", "epochs", "width", "train_subset", "test_subset", "batch_size", "lr")
#: config fields that do not change what a run computes: left out of the grouping key (the
#: GPU harness's switches are summed up by its "precision" entry, see _setting)
_NOT_SETTING = frozenset({"variant", "seed", "out", "progress", "threads", "device", "data_dir",
                          "download", "compile", "channels_last", "bf16", "tf32", "procs",
                          "stack", "precision", "stacked_seeds", "cudnn_benchmark"})


def _setting(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What must match for runs to share a table: the config but :data:`_NOT_SETTING`, and of
    its precision the arithmetic (autocast dtype, TF32); runs from before precision was
    recorded count as float32 without TF32, as they ran."""
    p = config.get("precision") or {}
    arith = {"autocast": p.get("autocast"), "tf32": [p.get("tf32_matmul"), p.get("tf32_cudnn")]}
    if arith == {"autocast": None, "tf32": [None, None]}:
        return setting_key(config, _NOT_SETTING)
    return setting_key(config | {"arithmetic": arith}, _NOT_SETTING)
_OTHER_EXPERIMENTS = ("vae", "seq", "dqn")


class Run(RunRecord):
    """A classification run as read back from its folder."""

    #: the epoch every run is compared at (``--at-epoch``; None: the last configured one)
    at_epoch: int | None = None

    @property
    def epochs_done(self) -> int:
        return sum(1 for m in self.metrics if not m.get("diverged"))

    @property
    def last_epoch(self) -> int:
        """The epoch its final values are taken from."""
        return self.at_epoch or int(self.config["epochs"])

    @property
    def complete(self) -> bool:
        """Every configured epoch (or every one up to ``at_epoch``) written, no divergence."""
        return not self.diverged and self.epochs_done >= self.last_epoch

    @property
    def status(self) -> str:
        """``complete``, ``diverged`` or ``incomplete`` (in progress, or stopped early)."""
        return "diverged" if self.diverged else ("complete" if self.complete else "incomplete")

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        return _setting(self.config)

    def note(self) -> str:
        """One line on why this run is left out of the numbers."""
        if self.diverged:
            last = self.metrics[-1]
            loss = str(last.get("loss", "nan"))
            what = f"training loss {loss}" if loss.lstrip("+-") in ("nan", "inf") else loss
            return (f"`{self.folder}`: diverged ({what} in "
                    f"epoch {last.get('epoch', '?')} of {self.config.get('epochs')}, lr "
                    f"{last.get('lr', '?')})")
        return (f"`{self.folder}`: incomplete, {self.epochs_done} of {self.last_epoch} "
                "epochs written (still running, or stopped)")


def _read_run(folder: Path) -> Run:
    return Run.read(folder)


#: run folders whose experiment writes its own report: the command that does
_OWN_REPORT = {"graph": "python -m experiments.graph --report-only --out DIR",
               "norm-growth": "python -m experiments.norm_growth --report-only --out DIR"}


def _kind(config: dict[str, Any]) -> str:
    if config.get("experiment") in _OTHER_EXPERIMENTS:
        return "others"
    if config.get("experiment") == "graph" or config.get("kind") == "norm-growth":
        return config.get("experiment") or config["kind"]
    return "lr-sweep" if config.get("kind") == "lr-sweep" else "classify"


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WnormError(f"{folder}: config.json is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise WnormError(f"{folder}: config.json holds a {type(config).__name__}, not a run's "
                         "config")
    kind = _kind(config)
    if kind in _OWN_REPORT:
        raise WnormError(f"{folder}: a {kind} run, which experiments.report does not read; "
                         f"its own report: {_OWN_REPORT[kind]}")
    if kind == "classify" and not {"variant", "dataset", "epochs"} <= set(config):
        raise WnormError(f"{folder}: config.json is not a run's config (no "
                         f"{sorted({'variant', 'dataset', 'epochs'} - set(config))})")
    return config


def run_kind(paths: list[str | Path]) -> str:
    """``"classify"``, ``"lr-sweep"`` or ``"others"`` (vae/seq/dqn): the kind of every run
    folder in ``paths``.

    Raises:
        WnormError: a path does not exist, no run folder is there, or the kinds are mixed.
    """
    kinds: dict[str, Path] = {}
    for d in run_folders(paths):
        kinds.setdefault(_kind(_config(d)), d)
    if not kinds:
        raise WnormError(f"report: no run folder (a folder with config.json) in "
                         f"{list(map(str, paths))}")
    if len(kinds) > 1:
        raise WnormError("report: the folders mix kinds of run (" + ", ".join(
            f"{k} in {d}" for k, d in sorted(kinds.items())) + "); report each kind on its own")
    return next(iter(kinds))


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every classification run folder named in ``paths`` or directly inside one of them
    (each once), with metrics.

    Raises:
        WnormError: a path does not exist, no run folder (with ``config.json``) was found, a
            folder holds another kind of run, or two folders hold the same variant and seed of
            one setting.
    """
    folders = run_folders(paths)
    for d in folders:
        _config(d)  # refuses a folder that holds no classification run, naming it
    runs = [_read_run(d) for d in folders]
    if not runs:
        raise WnormError(f"report: no run folder (a folder with config.json) in "
                         f"{list(map(str, paths))}")
    for r in runs:
        if (kind := _kind(r.config)) != "classify":
            raise WnormError(f"report: {r.folder} is a {kind} run folder, not a classification "
                             "run; `python -m experiments.report` reports each kind on its own")
    if not any(r.metrics for r in runs):
        raise WnormError(f"report: the run folders in {list(map(str, paths))} have no metrics yet")
    # a run with none yet is kept: it is listed as incomplete, not dropped without a word
    refuse_duplicates(runs, lambda r: (r.variant, f"seed {r.config.get('seed')}"),
                      "variant and seed")
    return runs


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


def _default_target(by_variant: dict[str, list[Run]]) -> float | None:
    """The lowest training error every variant's seed-mean curve reaches (complete runs only;
    None when no variant has one)."""
    curves = [_mean_curve(rs, "train_error")[1] for rs in by_variant.values() if rs]
    if not curves:
        return None
    worst_best = max(min(c) for c in curves)
    return math.ceil(worst_best * 2 - 1e-9) / 2


def _beta1(c: dict[str, Any], sched: list[tuple[float, float]]) -> str:
    early, late = c.get("beta1", "?"), c.get("beta1_late", "?")
    if early == late:
        return f"{early} throughout"
    k = sum(1 for _, b in sched if b == early and b != late)
    return f"{early} for epochs 1-{k}, then {late}" if 0 < k < len(sched) else (
        f"{early} throughout" if k == len(sched) else f"{late} throughout")


def _schedule(c: dict[str, Any]) -> list[tuple[float, float]]:
    """``(lr, beta1)`` of every epoch of a run, from its own config (``decay_start`` as it was
    recorded: older runs wrote ``epochs // 2``, newer ``epochs / 2``)."""
    from types import SimpleNamespace

    from .classify import schedule

    cfg = SimpleNamespace(epochs=int(c["epochs"]), decay_start=c.get("decay_start"),
                          lr=float(c["lr"]), beta1=c.get("beta1", 0.9),
                          beta1_late=c.get("beta1_late", 0.5))
    return [schedule(cfg, e) for e in range(cfg.epochs)]  # type: ignore[arg-type]


def schedule_text(c: dict[str, Any]) -> str:
    """What the learning-rate and beta1 schedule of a run was, in words, from its config."""
    sched = _schedule(c)
    lr, epochs = float(c["lr"]), len(sched)
    full = next((i for i, (x, _) in enumerate(sched) if x != lr), epochs)
    if full == epochs:
        text = f"Adam lr {c['lr']} constant for all {epochs} epochs"
    else:
        h = c.get("decay_start")
        last = sched[-1][0]
        text = (f"Adam lr {c['lr']} for epochs 1-{full}, then linear decay (lr min(2 - e/h, 1) "
                f"for 0-based epoch e, h = {h:g}) to {last:.3g} in epoch {epochs}"
                + (" (so the last epoch ran at lr 0)" if last == 0 else ""))
    return f"{text}; beta1 {_beta1(c, sched)}"


def _fmt(mean: float, values: list[float]) -> str:
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


# --------------------------------------------------------------------------- outputs
def _differs(c: dict[str, Any], groups: list[dict[str, list[Run]]]) -> str:
    """The settings of ``c`` that not every table shares ("" with one table)."""
    if len(groups) < 2:
        return ""
    keys = [dict(next(r for rs in g.values() for r in rs).setting) for g in groups]
    mine = dict(_setting(c))
    diff = sorted(k for k in set().union(*keys) if len({kk.get(k) for kk in keys}) > 1)
    return "; ".join(f"data {c.get('data', {}).get('source', '?')}" if k == "data" else
                     f"precision {precision_text(c.get('precision'))}" if k == "arithmetic" else
                     f"{k} {c.get(k)}" for k in diff if k in mine)


def _table(by_all: dict[str, list[Run]], target: float | None, command: str,
           differs: str = "") -> str:
    by_variant = {v: [r for r in rs if r.complete] for v, rs in by_all.items()}
    every = [r for rs in by_all.values() for r in rs]
    any_run = every[0]
    c = any_run.config
    cfg = {k: c.get(k) for k in _SETTING}
    data = c.get("data", {})
    hardware = sorted({r.version.get("hardware", "?") for r in every})
    commits = sorted({(r.version.get("git_commit") or "?")[:10]
                      + ("+dirty" if r.version.get("git_dirty") else "") for r in every})
    left_out = [r for r in every if not r.complete]
    lines = [
        f"### {cfg['dataset']}: {_epochs(float(cfg['epochs']))} epochs, width {cfg['width']}, "
        f"{data.get('train', '?')} train / {data.get('test', '?')} test examples",
        "",
    ]
    if any_run.at_epoch is not None:
        lines += [f"- **Compared at epoch {any_run.at_epoch} of {cfg['epochs']}** (`--at-epoch "
                  f"{any_run.at_epoch}`): the runs were stopped before their last epoch, so the "
                  "final values below are that epoch's, before the learning rate finished its "
                  "schedule"]
    if differs:
        lines += [f"- Differs from the other tables: {differs}"]
    lines += [
        f"- Data: {data.get('source', '?')}; preprocessing {data.get('preprocessing', '?')}; "
        f"train subset {cfg['train_subset'] or 'full'}, test subset {cfg['test_subset'] or 'full'}",
        f"- Training: batch {cfg['batch_size']}, {schedule_text(c)}; data init on "
        f"{c.get('init_examples', '?')} examples (init scale {c.get('init_scale', '?')}); "
        f"input noise std {c.get('noise', '?')}, dropout {c.get('dropout', '?')}",
        f"- Hardware: {'; '.join(hardware)}; arithmetic: "
        + "; ".join(sorted({precision_text(r.config.get('precision')) for r in every})),
        *_shared_note(every),
        f"- Time: {len(every)} runs"
        + (f" ({len(every) - len(left_out)} complete)" if left_out else "") + ", "
        f"{sum(m.get('seconds', 0.0) + m.get('eval_seconds', 0.0) for r in every for m in r.metrics) / 60:.0f}"  # noqa: E501
        " minutes of training and evaluation in all (the sum over runs and epochs)",
        f"- Code: wnorm {any_run.version.get('wnorm', '?')}, torch "
        f"{any_run.version.get('torch', '?')}, git {', '.join(commits)}",
        f"- Generated by `{command}`",
        "",
    ]
    paper_note = "" if cfg["dataset"] == "cifar10" else " (CIFAR-10, full run; not this setting)"
    target_txt = f"{target:g}%" if target is not None else "X%"
    lines += [
        f"| variant | final test error % (mean ± std) | seeds | paper test error %{paper_note} "
        f"| final train error % | s/epoch vs normal | epochs to {target_txt} train error |",
        "|---|---|---|---|---|---|---|",
    ]
    normal_sec = (statistics.fmean(_sec_per_epoch(r) for r in by_variant["normal"])
                  if by_variant.get("normal") else None)
    reach: dict[str, float | None] = {}
    missed: dict[str, tuple[int, int]] = {}  # variant -> (seeds that missed the target, seeds)
    for v in _order(list(by_all)):
        rs = by_variant[v]
        diverged = sum(r.diverged for r in by_all[v])
        incomplete = sum(r.status == "incomplete" for r in by_all[v])
        notes = [f"{k} {what}" for k, what in ((diverged, "diverged"),
                                               (incomplete, "incomplete")) if k]
        seeds = f"{len(rs)}" + (f" (+{', '.join(notes)}: left out)" if notes else "")
        paper = PAPER_TABLE1.get(v)
        paper_txt = "" if paper is None else f"{paper[0]:.2f}" + (" (approx.)" if paper[1] else "")
        if not rs:
            why = "diverged" if diverged and not incomplete else "no complete run"
            lines.append(f"| {v} | {why} | {seeds} | {paper_txt} | {why} | n/a | n/a |")
            continue
        test = [100 * r.metrics[-1]["test_error"] for r in rs]
        train = [100 * r.metrics[-1]["train_error"] for r in rs]
        sec = statistics.fmean(_sec_per_epoch(r) for r in rs)
        rel = f"{sec / normal_sec:.2f}" if normal_sec else "n/a"
        if target is None:
            ep = "n/a"
        else:
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
    if "normal" in reach and target is not None:
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
    lines += _verdict(by_variant, reach, missed, target)
    if left_out:
        upto = (f"every epoch up to {any_run.at_epoch}" if any_run.at_epoch is not None
                else "every configured epoch")
        lines += [f"Left out of the table and the plot (only runs with {upto} count):", ""]
        lines += [f"- {r.note()}" for r in sorted(left_out, key=lambda r: str(r.folder))]
        lines.append("")
    return "\n".join(lines)


def _shared_note(runs: list[Run]) -> list[str]:
    """A line saying why the s/epoch column is not a cost, for runs that shared a device."""
    stack = max(int(r.config.get("stack", 1)) for r in runs)
    procs = max(int(r.config.get("procs", 1)) for r in runs)
    if stack == 1 and procs == 1:
        return []
    what = (f"{stack} seeds trained as one network, up to {procs} such processes"
            if stack > 1 else f"up to {procs} runs")
    return [f"- Seconds per epoch: wall time, with {what} sharing the machine; not a cost per "
            "variant (`python -m experiments.classify_gpu --timing` measures that)"]


def _verdict(by_variant: dict[str, list[Run]], reach: dict[str, float | None],
             missed: dict[str, tuple[int, int]], target: float | None) -> list[str]:
    """What the table says, in two sentences: the lowest final test error (and whether the
    next one is within the seeds' spread) and the order in which variants reached ``target``."""
    tests = {v: [100 * r.metrics[-1]["test_error"] for r in rs]
             for v, rs in by_variant.items() if rs}
    if not tests:
        return []
    ranked = sorted(tests, key=lambda v: statistics.fmean(tests[v]))
    best = ranked[0]
    a = tests[best]
    out = [f"- Lowest final test error: **{best}**, {_fmt(statistics.fmean(a), a)}% over "
           f"{len(a)} seed{'s' if len(a) > 1 else ''}"]
    if len(ranked) > 1:
        nxt = ranked[1]
        b = tests[nxt]
        if len(a) < 2 or len(b) < 2:
            spread = "one seed on a side, so there is no spread to judge the gap by"
        elif max(a) < min(b):
            spread = f"every seed of {best} is below every seed of {nxt}"
        else:
            spread = "their seed ranges overlap: the gap is within seed-to-seed spread"
        out[0] += (f"; next {nxt}, {_fmt(statistics.fmean(b), b)}%: {spread}.")
    else:
        out[0] += "."
    if "normal" in tests and len(tests) > 1:
        base = tests["normal"]
        vs = []
        for v in (v for v in ranked if v != "normal"):
            if len(tests[v]) < 2 or len(base) < 2:
                continue
            if max(tests[v]) < min(base):
                vs.append(f"{v} lower with every seed")
            elif min(tests[v]) > max(base):
                vs.append(f"{v} higher with every seed")
            else:
                vs.append(f"{v} within the seeds' spread")
        out.append("- Final test error against normal: " + ("; ".join(vs) + "." if vs else
                   "one seed on a side, so there is no spread to judge a gap by."))
    if target is not None and reach:
        done = sorted((r, v) for v, r in reach.items() if r is not None)
        order = ", ".join(f"{v} ({_epochs(r)})" for r, v in done)
        text = f"- First to {target:g}% training error (mean epochs over seeds): {order or 'none'}"
        late = [f"{v} (missed by {m} of {n} seeds)" for v, (m, n) in missed.items() if m]
        out.append(text + (f"; not every seed got there: {', '.join(late)}" if late else "")
                   + ".")
    return out + [""]


def _reached(variant: str, epochs: float | None, missed: int, seeds: int) -> str:
    if epochs is None:
        return f"{variant} missed it with {missed} of {seeds} seeds"
    return f"{variant} reached it with every seed ({_epochs(epochs)} epochs on average)"


def _epochs(n: float) -> str:
    """An epoch count: whole numbers as they are, means to one decimal."""
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


#: one colour per variant, the same in every plot (strict: a new variant needs one here; with
#: fewer colours than variants, arpit was drawn in matplotlib's first, weightnorm's blue)
VARIANT_COLORS = dict(zip(VARIANTS, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:orange",
                                    "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"),
                          strict=True))


def _plot(groups: dict[tuple[Any, ...], dict[str, list[Run]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, by_all in enumerate(groups.values()):
        cfg = next(r for rs in by_all.values() for r in rs).config
        by_variant = {v: [r for r in rs if r.complete] for v, rs in by_all.items()}
        for col, key in enumerate(("train_error", "test_error")):
            ax = axes[row][col]
            for v in _order(list(by_variant)):
                rs = by_variant[v]
                if not rs:
                    continue
                ep, mean, lo, hi = _mean_curve(rs, key)
                c = VARIANT_COLORS.get(v)
                ax.plot(ep, mean, label=f"{v} (n={len(rs)})", color=c, marker="o", ms=3)
                if len(rs) > 1:
                    ax.fill_between(ep, lo, hi, color=c, alpha=0.2, linewidth=0)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
            ax.set_title(f"{cfg['dataset']}, width {cfg['width']}: {key.split('_')[0]} error "
                         f"(mean over seeds, min-max band)", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no complete run", transform=ax.transAxes, ha="center")
    fig.savefig(path, dpi=110)


def _cut(runs: list[Run], at_epoch: int) -> None:
    """Compare every run configured for more epochs at ``at_epoch``: its metrics after it
    are set aside (a divergence later than it too: the run was sound up to there)."""
    if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 1:
        raise WnormError(f"--at-epoch must be a positive whole number; got {at_epoch!r}")
    if all(at_epoch >= int(r.config["epochs"]) for r in runs):
        raise WnormError(f"--at-epoch {at_epoch} is not before the last epoch of any run (they "
                         f"were configured for {sorted({int(r.config['epochs']) for r in runs})} "
                         "epochs): there is nothing to cut")
    for r in runs:  # a run configured for at most at_epoch epochs is compared at its end
        if at_epoch < int(r.config["epochs"]):
            r.metrics = [m for m in r.metrics if int(m.get("epoch", 0)) <= at_epoch]
            r.at_epoch = at_epoch


def report(paths: list[str | Path], out: str | Path, *, target_error: float | None = None,
           command: str | None = None, at_epoch: int | None = None) -> tuple[Path, Path, str]:
    """Write ``report.md`` and ``training_error.png`` into ``out`` from the runs in ``paths``;
    with ``at_epoch``, the runs are compared at that epoch (runs a time limit stopped before
    their last epoch), and the report says so.

    Returns:
        ``(markdown path, png path, markdown text)``.

    Raises:
        WnormError: no usable run folder in ``paths``, a ``target_error`` outside (0, 100), or
            an ``at_epoch`` that is not a whole number from 1 to the runs' epochs.
    """
    if target_error is not None and not 0 < target_error < 100:
        raise WnormError(f"--target-error must be a percentage in (0, 100); got {target_error}")
    out = check_out(out, "the report")
    runs = load_runs(paths)
    if at_epoch is not None:
        _cut(runs, at_epoch)
    groups: dict[tuple[Any, ...], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[r.setting][r.variant].append(r)
    out.mkdir(parents=True, exist_ok=True)
    command = command or ("python -m experiments.report " + " ".join(map(str, paths))
                          + f" --out {out}")
    png = out / "training_error.png"
    _plot(groups, png)
    parts = ["# Weight normalization: the classification experiment (Salimans & Kingma 2016, "
             "section 5)", "", f"![training error]({png.name})", ""]
    tables = list(groups.values())
    for by_all in tables:
        complete = {v: [r for r in rs if r.complete] for v, rs in by_all.items()}
        target = target_error if target_error is not None else _default_target(complete)
        c = next(r for rs in by_all.values() for r in rs).config
        parts.append(_table(by_all, target, command, _differs(c, tables)))
    text = "\n".join(parts)
    md = out / "report.md"
    md.write_text(text)
    return md, png, text


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.report RUNS... --out DIR``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.report",
                                description="run folders -> report.md and plots, whatever "
                                            "experiment wrote them")
    p.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    p.add_argument("--out", required=True, help="folder for report.md and the plots")
    p.add_argument("--target-error", type=float, default=None,
                   help="classification: X for the 'epochs to X%% training error' column "
                        "(default: the lowest training error every variant reaches)")
    p.add_argument("--at-epoch", type=int, default=None, metavar="N",
                   help="classification: compare the runs at epoch N (runs a time limit "
                        "stopped before their last epoch); the report says so")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="lr-sweep runs: a learning rate counts as good when its final training "
                        "loss is within this of the variant's best (default: 0.1 nats)")
    args = p.parse_args(argv)
    if args.target_error is not None and not 0 < args.target_error < 100:
        p.error(f"--target-error must be a percentage in (0, 100); got {args.target_error}")
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        p.error(f"--tolerance must be a finite number >= 0; got {args.tolerance}")
    command = "python -m experiments.report " + " ".join(argv)
    try:
        kind = run_kind(args.runs)
        if args.at_epoch is not None and kind != "classify":
            raise WnormError(f"--at-epoch is for classification runs; these are {kind} runs")
        if kind == "lr-sweep":
            from .report_sweep import report_sweep

            md, pngs, text = report_sweep(args.runs, args.out, tolerance=args.tolerance,
                                          command=command)
        elif kind == "others":
            from .report_others import report as report_others

            text = report_others([Path(r) for r in args.runs], Path(args.out), command=command)
            md = Path(args.out) / "report.md"
            pngs = sorted(Path(args.out).glob("*.png"))
        else:
            md, png, text = report(args.runs, args.out, target_error=args.target_error,
                                   command=command, at_epoch=args.at_epoch)
            pngs = [png]
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {md} and {', '.join(map(str, pngs))}")
    return 0


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
