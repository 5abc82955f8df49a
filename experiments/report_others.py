r"""The report of the paper's other experiments (section 6), normal vs weight norm.

Usage (``python -m experiments.report`` calls :func:`report` for these runs)::

    python -m experiments.report results/vae results/seq results/dqn results/dqn-no-init \
        --out results/others-report

The run folders of :mod:`experiments.vae`, :mod:`experiments.seq` and :mod:`experiments.dqn`
(``config.json`` with an ``"experiment"`` field, ``version.json``, ``metrics.jsonl``,
``log.txt``: :mod:`experiments.common`). Every number and plot in the report is computed here
from those files:

- ``vae.png``: test negative ELBO (nats per example) per epoch, mean over seeds, min-max band;
  and the training bound per logged step;
- ``seq.png``: the LSTM's training loss per logged step and test error per epoch;
- ``dqn.png``: episode return vs environment steps, one panel per environment: each seed's
  returns smoothed by a moving average over its last ``DQN_WINDOW`` episodes, then mean and
  min-max over seeds (DQN runs of ``weightnorm`` with ``--no-data-init`` are a third curve,
  ``weightnorm, no data init``);
- ``report.md``: one table per experiment and setting, and the answer to "did weight norm
  converge faster or to a better value than normal, by how much, with what spread".
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from wnorm import WnormError

from .common import RunRecord, check_out, mean_std_range as _ms, refuse_duplicates, run_folders

__all__ = ["EXPERIMENTS", "VARIANTS", "OtherRun", "load_other_runs", "report", "DQN_WINDOW",
           "run_command"]

EXPERIMENTS = ("vae", "seq", "dqn")
VARIANTS = ("normal", "weightnorm")
DQN_WINDOW = 10  # episodes in the moving average of the DQN return curves
NO_INIT = "weightnorm, no data init"  # dqn runs with --variant weightnorm --no-data-init
_COLORS = {"normal": "tab:gray", "weightnorm": "tab:blue", NO_INIT: "tab:orange"}
_COMMON = {"experiment", "variant", "seed", "out", "threads", "device"}


# --------------------------------------------------------------------------- reading
class OtherRun(RunRecord):
    """A vae, seq or dqn run as read back from its folder."""

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment"))

    @property
    def variant(self) -> str:
        """The variant, and for a weight-normalized DQN without data init :data:`NO_INIT`."""
        v = str(self.config["variant"])
        if self.experiment == "dqn" and v == "weightnorm" and self.config.get("data_init") is False:
            return NO_INIT
        return v

    @property
    def complete(self) -> bool:
        """All epochs written (vae, seq), or the log says the run finished (dqn); not diverged."""
        if self.diverged:
            return False
        if self.experiment == "dqn":
            log = self.folder / "log.txt"
            return log.is_file() and "] done: " in log.read_text()
        return len(self.metrics) >= int(self.config.get("epochs", 0))

    def note(self) -> str:
        """Why the run is left out of the numbers."""
        last = self.metrics[-1] if self.metrics else {}
        if self.diverged:
            return (f"`{self.folder}`: diverged (loss {last.get('loss', 'NaN/inf')} at step "
                    f"{last.get('step', '?')})")
        if self.experiment == "dqn":
            return (f"`{self.folder}`: incomplete, {last.get('env_steps', 0)} of "
                    f"{self.config.get('steps')} environment steps (still running, or stopped)")
        return (f"`{self.folder}`: incomplete, {len(self.metrics)} of "
                f"{self.config.get('epochs')} epochs written (still running, or stopped)")

    def setting(self) -> tuple[Any, ...]:
        """What must match for two runs to be compared (everything but variant and seed)."""
        skip = _COMMON | {"data", "init_summary", "data_init"}
        return tuple(sorted((k, json.dumps(v)) for k, v in self.config.items() if k not in skip))


def _read(folder: Path) -> OtherRun:
    return OtherRun.read(folder)


def load_other_runs(paths: list[Path]) -> list[OtherRun]:
    """Run folders named in ``paths`` or directly inside them, with an ``experiment`` of
    :data:`EXPERIMENTS` (at least one of them with a metrics line).

    Raises:
        WnormError: a path does not exist, or none of them holds such a run folder.
    """
    runs = [_read(d) for d in run_folders(paths, "others_report")]
    # a run with no metrics yet is kept: listed as incomplete, not dropped without a word
    runs = [r for r in runs if r.experiment in EXPERIMENTS]
    if not any(r.metrics for r in runs):
        raise WnormError(f"others_report: no run folder of the experiments {list(EXPERIMENTS)} "
                         f"with metrics in {[str(p) for p in paths]}")
    refuse_duplicates(runs, lambda r: (r.experiment, r.variant, f"seed {r.config.get('seed')}"),
                      "experiment, variant and seed")
    return runs


# --------------------------------------------------------------------------- numbers
def _band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    n = min(len(c) for c in curves)
    cols = [[c[i] for c in curves] for i in range(n)]
    return ([statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols])


def _verdict(normal: list[float], wn: list[float], lower_better: bool, digits: int,
             name: str = "weightnorm") -> tuple[float, float, float, str, str] | None:
    """``(normal mean, wn mean, wn - normal, which is better, spread note)``; None if unmeasured.
    A difference that rounds to 0 at ``digits`` decimals is a tie ("neither")."""
    normal = [v for v in normal if not math.isnan(v)]
    wn = [v for v in wn if not math.isnan(v)]
    if not normal or not wn:
        return None
    mn, mw = statistics.fmean(normal), statistics.fmean(wn)
    diff = mw - mn
    if round(diff, digits) == 0:
        who = "neither"
    else:
        who = name if (diff < 0) == lower_better else "normal"
    if len(normal) < 2 or len(wn) < 2:
        spread = "a single seed on one side, so no spread to compare with"
    elif max(wn) < min(normal) or max(normal) < min(wn):
        spread = "the seed ranges do not overlap"
    else:
        spread = "the seed ranges overlap, so the difference is within seed-to-seed spread"
    return mn, mw, diff, who, spread


class _Summary(list[str]):
    """Rows of the report's first table, one per comparison that answers the question."""

    def add(self, where: str, measure: str, normal: list[float], wn: list[float],
            lower_better: bool, digits: int = 2, variant: str = "weightnorm") -> None:
        v = _verdict(normal, wn, lower_better, digits, variant)
        if v is None:
            return
        mn, mw, diff, who, spread = v
        if variant != "weightnorm":
            measure += f" [{variant}]"
        self.append(f"| {where} | {measure} | {_ms(normal, digits)} | {_ms(wn, digits)} | "
                    f"{diff:+.{digits}f} | **{who}**; {spread.split(',')[0]} |")


def _compare(name: str, normal: list[float], wn: list[float], unit: str, lower_better: bool,
             digits: int = 2, variant: str = "weightnorm") -> str:
    """A sentence: is ``variant`` (``wn``) or normal better on ``name``, by how much, and do
    the seeds overlap."""
    v = _verdict(normal, wn, lower_better, digits, variant)
    if v is None:
        return f"{name}: not measured in these runs."
    mn, mw, diff, who, spread = v
    u = f" {unit}" if unit else ""
    return (f"{name}: {variant} {mw:.{digits}f} vs normal {mn:.{digits}f}{u} "
            f"(difference {diff:+.{digits}f}{u}; better: **{who}**; {spread}).")


def run_command(argv: list[str] | None) -> str | None:
    """The command line that made a run, from ``version.json``'s ``argv`` (``python -m ...``),
    as it runs today: runs made before the experiments moved out of the package (as
    ``wnorm.repro.X``) name ``experiments.X``, which runs that experiment today."""
    if not argv:
        return None
    head, rest = Path(argv[0]), list(argv[1:])
    if head.parent.name == "repro" and head.parent.parent.name == "wnorm":
        # the package has moved: the command that runs the experiment today (its __main__
        # took the experiment's name first)
        name = rest.pop(0) if head.stem == "__main__" and rest else head.stem
        head_txt = f"python -m experiments.{name}"
    elif head.parent.name == "experiments":
        head_txt = f"python -m experiments.{head.stem}"
    else:
        head_txt = head.name
    return " ".join([head_txt, *rest])


def _setting_lines(runs: list[OtherRun], keys: list[str], command: str) -> list[str]:
    c = runs[0].config
    hardware = sorted({r.version.get("hardware", "?") for r in runs})
    commits = sorted({(r.version.get("git_commit") or "?")[:10]
                      + ("+dirty" if r.version.get("git_dirty") else "") for r in runs})
    data = c.get("data")
    lines = ["- Settings: " + ", ".join(f"{k} {c.get(k)}" for k in keys if k in c)]
    if data:
        lines.append(f"- Data: {data.get('name', '?')} from {data.get('source', '?')}, "
                     f"{data.get('train', '?')} train / {data.get('test', '?')} test "
                     f"examples; preprocessing {data.get('preprocessing', '?')}")
    made = sorted({cmd for r in runs if (cmd := run_command(r.version.get("argv")))})
    if made:
        moved = any(Path(str((r.version.get("argv") or [""])[0])).parent.name == "repro"
                    for r in runs)
        lines.append("- Runs made by: " + "; ".join(f"`{m}`" for m in made) + (
            " (at the commit named under Code its module was `wnorm.repro`, since moved to "
            "`experiments`)" if moved else ""))
    lines += [f"- Hardware: {'; '.join(hardware)}",
              f"- Code: wnorm {runs[0].version.get('wnorm', '?')}, torch "
              f"{runs[0].version.get('torch', '?')}, git {', '.join(commits)}",
              f"- Generated by `{command}`", ""]
    return lines


def _seeds(rs: list[OtherRun]) -> str:
    bad = sum(not r.complete for r in rs)
    return f"{len(rs)}" + (f" ({bad} incomplete)" if bad else "")


def _by_variant(runs: list[OtherRun]) -> dict[str, list[OtherRun]]:
    out: dict[str, list[OtherRun]] = {}
    for v in VARIANTS + tuple(sorted({r.variant for r in runs} - set(VARIANTS))):
        rs = sorted((r for r in runs if r.variant == v), key=lambda r: r.config.get("seed", 0))
        if rs:
            out[v] = rs
    return out


def _first_reach(xs: list[float], ys: list[float], target: float, lower_better: bool
                 ) -> float | None:
    for x, y in zip(xs, ys):
        if (y <= target + 1e-12) if lower_better else (y >= target - 1e-12):
            return x
    return None


def _reach_text(hits: list[float | None], unit: str) -> str:
    got = [h for h in hits if h is not None]
    if not got:
        return f"not reached (0 of {len(hits)} seeds)"
    fmt = ",.0f" if min(got) >= 100 else ".3g"
    txt = f"{statistics.fmean(got):{fmt}}" + (f" {unit}" if unit else "")
    if len(got) > 1 and min(got) != max(got):
        txt += f" ({min(got):{fmt}} to {max(got):{fmt}})"
    if len(got) < len(hits):
        txt += f"; not reached by {len(hits) - len(got)} of {len(hits)} seeds"
    return txt


# --------------------------------------------------------------------------- VAE
def _vae(groups: list[list[OtherRun]], png: Path, command: str, summary: _Summary) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    parts = ["## Convolutional VAE (section 6: \"lower-variance training and a better bound\")",
             "", f"![VAE test bound]({png.name})", ""]
    for row, runs in enumerate(groups):
        byv = _by_variant(runs)
        c = runs[0].config
        for v, rs in byv.items():
            ep = [m["epoch"] for m in rs[0].metrics]
            mean, lo, hi = _band([[m["test_neg_elbo"] for m in r.metrics] for r in rs])
            ax = axes[row][0]
            ax.plot(ep[:len(mean)], mean, marker="o", ms=3, color=_COLORS.get(v),
                    label=f"{v} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(ep[:len(mean)], lo, hi, color=_COLORS.get(v), alpha=0.2, lw=0)
            steps = [[s for m in r.metrics for s in m.get("step_losses", [])] for r in rs]
            mean, lo, hi = _band([[y for _, y in s] for s in steps])
            xs = [x for x, _ in steps[0]][:len(mean)]
            ax = axes[row][1]
            ax.plot(xs, mean, color=_COLORS.get(v), lw=1, label=f"{v} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=_COLORS.get(v), alpha=0.2, lw=0)
        axes[row][0].set(xlabel="epoch", ylabel="test negative ELBO (nats / example)",
                         title="test bound (lower is better): mean over seeds, min-max band")
        axes[row][1].set(xlabel="training step", ylabel="negative ELBO of the batch (nats)",
                         title="training bound per logged step: mean, min-max band")
        lo_y = min(m["test_neg_elbo"] for r in runs for m in r.metrics)
        top = max(m["test_neg_elbo"] for r in runs for m in r.metrics[1:] or r.metrics)
        axes[row][1].set_ylim(lo_y - 10, top + 40)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.title.set_fontsize(10)

        parts.append(f"### {c.get('epochs')} epochs, {c.get('data', {}).get('train', '?')} "
                     f"train / {c.get('data', {}).get('test', '?')} test images")
        parts += _setting_lines(runs, ["channels", "latent", "blocks", "batch_size", "lr",
                                       "init_examples", "binarize"], command)
        parts += ["| variant | seeds | final test -ELBO (nats): mean ± std (min to max) "
                  "| best-epoch test -ELBO | final train -ELBO | step-to-step noise of the "
                  "training bound (nats) | s / epoch |", "|---|---|---|---|---|---|---|"]
        final, noise = {}, {}
        for v, rs in byv.items():
            final[v] = [r.metrics[-1]["test_neg_elbo"] for r in rs]
            best = [min(m["test_neg_elbo"] for m in r.metrics) for r in rs]
            train = [r.metrics[-1]["train_neg_elbo"] for r in rs]
            noise[v] = [_step_noise(r) for r in rs]
            secs = [statistics.fmean(m["seconds"] for m in r.metrics) for r in rs]
            parts.append(f"| {v} | {_seeds(rs)} | {_ms(final[v])} | {_ms(best)} | {_ms(train)} "
                         f"| {_ms(noise[v])} | {statistics.fmean(secs):.1f} |")
        parts.append("")
        parts.append("Step-to-step noise: the standard deviation of the differences between "
                     "consecutive logged training bounds in the second half of training "
                     "(divided by sqrt(2)), per seed; a measure of how noisy training is.")
        parts.append("")
        if "normal" in byv and "weightnorm" in byv:
            parts.append("**Answer.** " + _compare("Final test bound", final["normal"],
                                                   final["weightnorm"], "nats", True))
            where = f"VAE, {c.get('epochs')} epochs"
            summary.add(where, "final test -ELBO (nats, lower better)", final["normal"],
                        final["weightnorm"], True)
            summary.add(where, "training-bound noise (nats, lower better)", noise["normal"],
                        noise["weightnorm"], True)
            target = statistics.fmean(final["normal"])
            ep = [_first_reach([m["epoch"] for m in r.metrics],
                               [m["test_neg_elbo"] for m in r.metrics], target, True)
                  for r in byv["weightnorm"]]
            parts.append(f"Speed: weightnorm reached normal's final mean test bound "
                         f"({target:.2f} nats, after {c.get('epochs')} epochs) after "
                         f"{_reach_text(ep, 'epochs')}. "
                         + _compare("Training noise", noise["normal"], noise["weightnorm"],
                                    "nats", True))
            parts.append("")
    fig.savefig(png, dpi=110)
    return "\n".join(parts)


def _step_noise(run: OtherRun) -> float:
    """Std of the differences of consecutive logged training bounds in the second half of
    the steps, over sqrt(2): the noise of one logged value, with the trend removed."""
    steps = [s for m in run.metrics for s in m.get("step_losses", [])]
    ys = [y for _, y in steps[len(steps) // 2:]]
    if len(ys) < 3:
        return float("nan")
    d = [b - a for a, b in zip(ys, ys[1:])]
    return statistics.stdev(d) / math.sqrt(2)


# --------------------------------------------------------------------------- sequences
def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _seq(groups: list[list[OtherRun]], png: Path, command: str, summary: _Summary) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    parts = ["## LSTM on Fashion-MNIST rows (section 6: DRAW's \"large convergence speed-up\" "
             "from WN on the LSTM)", "", f"![LSTM training loss]({png.name})", ""]
    for row, runs in enumerate(groups):
        byv = _by_variant(runs)
        c = runs[0].config
        smooth_k = 5
        curves: dict[str, tuple[list[int], list[list[float]]]] = {}
        for v, rs in byv.items():
            steps = [[s for m in r.metrics for s in m["step_losses"]] for r in rs]
            xs = [x for x, _ in steps[0]]
            ys = [_smooth([y for _, y in s], smooth_k) for s in steps]
            curves[v] = (xs, ys)
            mean, lo, hi = _band(ys)
            ax = axes[row][0]
            ax.plot(xs[:len(mean)], mean, color=_COLORS.get(v), lw=1.2, label=f"{v} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(xs[:len(mean)], lo, hi, color=_COLORS.get(v), alpha=0.2, lw=0)
            ep = [m["epoch"] for m in rs[0].metrics]
            mean, lo, hi = _band([[100 * m["test_error"] for m in r.metrics] for r in rs])
            ax = axes[row][1]
            ax.plot(ep[:len(mean)], mean, marker="o", ms=3, color=_COLORS.get(v),
                    label=f"{v} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(ep[:len(mean)], lo, hi, color=_COLORS.get(v), alpha=0.2, lw=0)
        axes[row][0].set(xlabel="training step", ylabel="cross-entropy",
                         title=f"training loss (moving average of {smooth_k} logged steps, "
                               "every " f"{c.get('log_every')} steps): mean, min-max")
        axes[row][1].set(xlabel="epoch", ylabel="test error (%)",
                         title="test error: mean over seeds, min-max band")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.title.set_fontsize(10)

        parts.append(f"### {c.get('epochs')} epochs, hidden {c.get('hidden')}, "
                     f"{c.get('data', {}).get('train', '?')} train / "
                     f"{c.get('data', {}).get('test', '?')} test sequences")
        parts += _setting_lines(runs, ["hidden", "batch_size", "lr", "init_examples",
                                       "log_every"], command)
        parts += [f"| variant | seeds | final test error % | final training loss (last "
                  f"{smooth_k} logged steps) | training loss at step {_mid(curves)} "
                  f"| s / epoch | init |", "|---|---|---|---|---|---|---|"]
        err, last, mid = {}, {}, {}
        for v, rs in byv.items():
            err[v] = [100 * r.metrics[-1]["test_error"] for r in rs]
            xs, ys = curves[v]
            last[v] = [y[-1] for y in ys]
            k = min(range(len(xs)), key=lambda i: abs(xs[i] - _mid(curves)))
            mid[v] = [y[k] for y in ys]
            secs = [statistics.fmean(m["seconds"] for m in r.metrics) for r in rs]
            parts.append(f"| {v} | {_seeds(rs)} | {_ms(err[v])} | {_ms(last[v], 3)} | "
                         f"{_ms(mid[v], 3)} | {statistics.fmean(secs):.1f} | "
                         f"{rs[0].config.get('init_summary', '')} |")
        parts.append("")
        if "normal" in byv and "weightnorm" in byv:
            target = statistics.fmean(last["normal"])
            xs, ys = curves["weightnorm"]
            hits = [_first_reach(xs, y, target, True) for y in ys]
            total = curves["normal"][0][-1]
            where = f"LSTM, {c.get('epochs')} epochs"
            summary.add(where, "final test error % (lower better)", err["normal"],
                        err["weightnorm"], True)
            summary.add(where, f"training loss at step {_mid(curves)} (lower better)",
                        mid["normal"], mid["weightnorm"], True, 3)
            parts += ["**Answer.** " + _compare("Final test error", err["normal"],
                                                 err["weightnorm"], "%", True),
                      _compare(f"Training loss at step {_mid(curves)}", mid["normal"],
                               mid["weightnorm"], "", True, 3),
                      f"Speed: weightnorm's smoothed training loss reached normal's final value "
                      f"({target:.3f}, at step {total}) after {_reach_text(hits, 'steps')}.",
                      ""]
    fig.savefig(png, dpi=110)
    return "\n".join(parts)


def _mid(curves: dict[str, tuple[list[int], list[list[float]]]]) -> int:
    xs = next(iter(curves.values()))[0]
    return xs[len(xs) // 4] if xs else 0


# --------------------------------------------------------------------------- DQN
def _dqn_curve(run: OtherRun, grid: list[int]) -> list[float]:
    """Per grid step: mean return of the last DQN_WINDOW episodes finished by then (NaN before
    the first episode)."""
    rows = run.metrics
    out, j = [], 0
    for g in grid:
        while j < len(rows) and rows[j]["env_steps"] <= g:
            j += 1
        window = [r["return"] for r in rows[max(0, j - DQN_WINDOW):j]]
        out.append(statistics.fmean(window) if window else float("nan"))
    return out


def _nanband(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    cols = list(zip(*curves))
    ok = [[v for v in c if not math.isnan(v)] for c in cols]
    return ([statistics.fmean(v) if v else math.nan for v in ok],
            [min(v) if v else math.nan for v in ok], [max(v) if v else math.nan for v in ok])


def _dqn(groups: list[list[OtherRun]], png: Path, command: str, summary: _Summary) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(groups), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    parts = ["## Deep Q-learning (section 6: WN \"improves scores in most games\")", "",
             f"![DQN returns]({png.name})", "",
             f"Curves and the 'last 20%' column: each seed's training-episode returns "
             f"(epsilon-greedy, as collected) smoothed by a moving average over its last "
             f"{DQN_WINDOW} episodes, on a grid of environment steps; then mean and min-max "
             f"over seeds.", ""]
    for col, runs in enumerate(groups):
        byv = _by_variant(runs)
        c = runs[0].config
        steps = int(c["steps"])
        grid = list(range(steps // 100, steps + 1, max(1, steps // 100)))
        ax = axes[col]
        curves = {}
        for v, rs in byv.items():
            curves[v] = [_dqn_curve(r, grid) for r in rs]
            mean, lo, hi = _nanband(curves[v])
            ax.plot(grid, mean, color=_COLORS.get(v), lw=1.3, label=f"{v} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(grid, lo, hi, color=_COLORS.get(v), alpha=0.2, lw=0)
        thr = c.get("reward_threshold")  # None: the environment has none (gymnasium's spec)
        thr_text = "none" if thr is None else f"{thr:g}"
        if thr is not None:
            ax.axhline(thr, color="k", ls=":", lw=0.8, label=f"reward threshold {thr:g}")
        ax.set(xlabel="environment steps", ylabel=f"return ({DQN_WINDOW}-episode moving avg.)",
               title=f"{c['env']}: mean over seeds, min-max band")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

        parts.append(f"### {c['env']}: {steps} environment steps per run")
        parts += _setting_lines(runs, ["hidden", "layers", "lr", "batch_size", "buffer",
                                       "learning_starts", "train_every", "target_every",
                                       "eps_end", "eps_fraction", "gamma"], command)
        # a level every variant's seed-mean curve reaches (floored to a multiple of 10), so
        # "steps to reach it" compares speed even when the gym threshold is out of reach
        level = math.floor(min(max(v for v in _nanband(cv)[0] if not math.isnan(v))
                               for cv in curves.values()) / 10) * 10
        parts += [f"| variant | seeds | mean return, last 20% of steps | mean return over all "
                  f"training episodes | env steps to a {DQN_WINDOW}-episode average of "
                  f"{level:g} | seeds reaching the threshold {thr_text} | episodes | s / run |",
                  "|---|---|---|---|---|---|---|---|"]
        last, allr, reach = {}, {}, {}
        for v, rs in byv.items():
            tail = [i for i, g in enumerate(grid) if g > 0.8 * steps]
            last[v] = [statistics.fmean(cv[i] for i in tail) for cv in curves[v]]
            allr[v] = [statistics.fmean(m["return"] for m in r.metrics) for r in rs]
            reach[v] = [_first_reach(grid, cv, level, False) for cv in curves[v]]
            solved = ("n/a" if thr is None else
                      f"{sum(_first_reach(grid, cv, thr, False) is not None for cv in curves[v])}"
                      f" of {len(rs)}")
            secs = [r.metrics[-1]["seconds"] for r in rs]
            parts.append(f"| {v} | {_seeds(rs)} | {_ms(last[v], 1)} | {_ms(allr[v], 1)} | "
                         f"{_reach_text(reach[v], 'steps')} | {solved} | "
                         f"{statistics.fmean(len(r.metrics) for r in rs):.0f} | "
                         f"{statistics.fmean(secs):.0f} |")
        parts += ["", f"The level {level:g} is the best {DQN_WINDOW}-episode average that every "
                  f"variant's seed-mean curve reaches (floored to a multiple of 10); the "
                  f"environment's reward threshold is {thr_text}.", ""]
        if "normal" in byv and "weightnorm" in byv:
            where = f"DQN {c['env']}, {steps} steps"
            summary.add(where, "return, last 20% of steps (higher better)", last["normal"],
                        last["weightnorm"], False, 1)
            summary.add(where, "mean return over all episodes (higher better)", allr["normal"],
                        allr["weightnorm"], False, 1)
            parts += ["**Answer.** " + _compare("Return over the last 20% of steps",
                                                 last["normal"], last["weightnorm"], "", False, 1),
                      _compare("Mean return over all training episodes (higher = learned "
                               "faster)", allr["normal"], allr["weightnorm"], "", False, 1),
                      f"Steps to a {DQN_WINDOW}-episode average of {level:g}: weightnorm "
                      f"{_reach_text(reach['weightnorm'], 'steps')}; normal "
                      f"{_reach_text(reach['normal'], 'steps')}.", ""]
            for other in (v for v in byv if v not in ("normal", "weightnorm")):
                summary.add(where, "return, last 20% of steps (higher better)",
                            last["normal"], last[other], False, 1, other)
                summary.add(where, "mean return over all episodes (higher better)",
                            allr["normal"], allr[other], False, 1, other)
                parts += [f"Also {other}: " + _compare(
                    "return over the last 20% of steps", last["normal"], last[other], "", False,
                    1, other) + " " + _compare("Mean return over all training episodes",
                                                allr["normal"], allr[other], "", False, 1, other)
                          + f" Steps to {level:g}: {_reach_text(reach[other], 'steps')}.", ""]
    fig.savefig(png, dpi=110)
    return "\n".join(parts)


# --------------------------------------------------------------------------- report
def _groups(runs: list[OtherRun]) -> list[list[OtherRun]]:
    by: dict[tuple[Any, ...], list[OtherRun]] = defaultdict(list)
    for r in runs:
        by[r.setting()].append(r)
    return list(by.values())


def report(run_dirs: list[Path], out_dir: Path, *, command: str | None = None) -> str:
    """Write ``vae.png``, ``seq.png``, ``dqn.png`` (those with runs) and ``report.md`` into
    ``out_dir`` from the run folders in ``run_dirs`` (run folders or folders of them).

    Returns:
        The markdown text (also written to ``out_dir/report.md``).

    Raises:
        WnormError: no run folder of :data:`EXPERIMENTS` with metrics in ``run_dirs``.
    """
    out_dir = check_out(out_dir, "the report")
    runs = load_other_runs([Path(p) for p in run_dirs])
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or ("python -m experiments.report "
                          + " ".join(map(str, run_dirs)) + f" --out {out_dir}")
    parts = ["# Weight normalization: the paper's other experiments (Salimans & Kingma 2016, "
             "section 6), normal vs weight norm", "",
             "Small CPU-sized versions of the paper's experiments; every number below is "
             "computed from the run folders' metrics.jsonl by `experiments.report_others`. "
             "'± x' is the standard deviation over seeds, '(a to b)' the range.", ""]
    makers = {"vae": _vae, "seq": _seq, "dqn": _dqn}
    summary = _Summary()
    sections = []
    for exp in EXPERIMENTS:
        these = [r for r in runs if r.experiment == exp]
        done = [r for r in these if r.complete]
        if done:
            sections.append(makers[exp](_groups(done), out_dir / f"{exp}.png", command,
                                        summary))
        left = [r for r in these if not r.complete]
        if left:
            sections.append("\n".join(
                [f"### {exp}: runs left out of the numbers above", "",
                 "Only complete runs count; these are still running, were stopped, or "
                 "diverged:", ""] + [f"- {r.note()}" for r in left] + [""]))
    if summary:
        parts += ["## Summary", "", "| experiment | measure | normal: mean ± std (min to max) "
                  "| weightnorm | weightnorm - normal | better; seed ranges |",
                  "|---|---|---|---|---|---|", *summary, ""]
    text = "\n".join(parts + sections)
    (out_dir / "report.md").write_text(text)
    return text
