"""The reports count only complete runs, show diverged and unfinished ones for what they are,
never merge runs of different settings or count one run twice, and refuse folders that are
not theirs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wnorm import WnormError
from experiments.classify import main as classify_main
from experiments.report import main, report
from experiments.report_others import report as others_report

from fakes import write_fashion


def _fake_run(root: Path, variant: str, seed: int, test_errors: list[float], epochs: int = 3,
              diverged_at: int | None = None, partial_tail: bool = False,
              **config: object) -> Path:
    folder = root / f"fashion-mnist-{variant}-s{seed}"
    folder.mkdir(parents=True)
    cfg = {"dataset": "fashion-mnist", "variant": variant, "seed": seed, "epochs": epochs,
           "width": 0.125, "train_subset": 100, "test_subset": None, "zca": False,
           "batch_size": 10, "lr": 0.001, "beta1": 0.9, "beta1_late": 0.5, "beta2": 0.999,
           "decay_start": epochs / 2, "init_examples": 10, "noise": 0.15, "dropout": 0.5,
           "data": {"source": "fake", "train": 100, "test": 50, "preprocessing": "none"}}
    (folder / "config.json").write_text(json.dumps(cfg | config))
    rows = [{"epoch": i + 1, "train_error": e, "test_error": e, "train_loss": 1.0,
             "test_loss": 1.0, "seconds": 1.0, "eval_seconds": 0.1, "lr": 0.001}
            for i, e in enumerate(test_errors)]
    if diverged_at is not None:
        rows.append({"epoch": diverged_at, "diverged": True, "loss": "nan", "train_loss": None,
                     "train_error": None, "test_loss": None, "test_error": None,
                     "seconds": 1.0, "eval_seconds": 0.0, "lr": 1000.0})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if partial_tail:
        text += '{"epoch": 9, "train_err'  # killed while writing
    (folder / "metrics.jsonl").write_text(text)
    return folder


def _row(md: str, variant: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {variant} |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_incomplete_runs_are_left_out_of_final_values_and_listed(tmp_path: Path) -> None:
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    _fake_run(tmp_path, "normal", 1, [0.5, 0.3, 0.22])
    cut = _fake_run(tmp_path, "normal", 2, [0.9])  # still running: 1 of 3 epochs
    md = report([tmp_path], tmp_path / "rep")[2]
    row = _row(md, "normal")
    assert row[1] == "21.00 ± 1.41"  # the two complete runs only
    assert "1 incomplete" in row[2] and row[2].startswith("2")
    assert f"`{cut}`: incomplete, 1 of 3 epochs" in md


def test_runs_a_time_limit_stopped_are_compared_at_an_epoch_they_all_reached(
        tmp_path: Path, capsys) -> None:
    # five variants stopped one epoch short: no complete run, unless compared at epoch 2
    for v in ("normal", "weightnorm"):
        for seed in (0, 1):
            _fake_run(tmp_path, v, seed, [0.5, 0.3 if v == "normal" else 0.2])
    late = _fake_run(tmp_path, "weightnorm", 2, [0.5, 0.1, 0.05], diverged_at=3)
    early = _fake_run(tmp_path, "normal", 2, [0.9])
    md = report([tmp_path], tmp_path / "all")[2]
    assert "Compared at epoch" not in md and _row(md, "normal")[1] == "no complete run"
    md = report([tmp_path], tmp_path / "at2", at_epoch=2)[2]
    assert "**Compared at epoch 2 of 3** (`--at-epoch 2`)" in md
    assert _row(md, "normal")[1] == "30.00 ± 0.00"  # epoch 2's errors of the two that got there
    assert _row(md, "weightnorm")[1] == "16.67 ± 5.77"  # a divergence after epoch 2 set aside
    assert f"`{early}`: incomplete, 1 of 2 epochs" in md and str(late) not in md.split("Left")[-1]
    for bad, why in ((3, "not before the last epoch of any run"), (0, "positive whole")):
        with pytest.raises(WnormError, match=why):
            report([tmp_path], tmp_path / "bad", at_epoch=bad)
    assert "only runs with every epoch up to 2 count" in md
    # a table of runs configured for no more epochs than that is compared at its end, as is
    longer = tmp_path / "longer"
    _fake_run(longer, "normal", 0, [0.5, 0.3, 0.2, 0.1], epochs=4)
    md = report([tmp_path / "fashion-mnist-normal-s0", longer], tmp_path / "mixed", at_epoch=3)[2]
    assert md.count("Compared at epoch") == 1 and "**Compared at epoch 3 of 4**" in md
    assert main([str(tmp_path), "--out", str(tmp_path / "cli"), "--at-epoch", "2"]) == 0
    assert "--at-epoch 2" in (tmp_path / "cli" / "report.md").read_text()


def test_a_run_with_no_metrics_yet_is_listed_as_incomplete_not_dropped(tmp_path: Path) -> None:
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    _fake_run(tmp_path, "weightnorm", 0, [0.5, 0.3, 0.10])
    empty = _fake_run(tmp_path, "normal", 1, [])
    md = report([tmp_path], tmp_path / "rep")[2]
    assert f"`{empty}`: incomplete, 0 of 3 epochs" in md
    assert _row(md, "normal")[1] == "20.00"


def test_a_killed_runs_half_written_line_marks_it_incomplete(tmp_path: Path) -> None:
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    killed = _fake_run(tmp_path, "normal", 1, [0.5, 0.3], partial_tail=True)
    md = report([tmp_path], tmp_path / "rep")[2]
    assert f"`{killed}`: incomplete, 2 of 3 epochs" in md
    assert _row(md, "normal")[1] == "20.00"


def test_a_bad_line_in_the_middle_is_still_an_error(tmp_path: Path) -> None:
    folder = _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(WnormError, match="metrics.jsonl:2: not a JSON line"):
        report([tmp_path], tmp_path / "rep")


def test_a_diverged_run_shows_as_diverged(tmp_path: Path) -> None:
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    div = _fake_run(tmp_path, "batchnorm", 0, [0.9], diverged_at=2)
    late = _fake_run(tmp_path, "weightnorm", 0, [0.5, 0.3], diverged_at=3)
    md = report([tmp_path], tmp_path / "rep")[2]
    assert _row(md, "batchnorm")[1] == "diverged" and "1 diverged" in _row(md, "batchnorm")[2]
    assert _row(md, "weightnorm")[1] == "diverged"  # late divergence is not 'incomplete'
    assert f"`{div}`: diverged" in md and f"`{late}`: diverged" in md
    assert "incomplete" not in md


@pytest.mark.parametrize("field,value", [("zca", True), ("dropout", 0.0), ("noise", 0.0),
                                         ("beta1_late", 0.9), ("decay_start", 1.0),
                                         ("init_examples", 20), ("init_scale", 2.0),
                                         ("data", {"source": "elsewhere", "train": 100})])
def test_runs_with_different_settings_are_not_merged(tmp_path: Path, field: str,
                                                     value: object) -> None:
    _fake_run(tmp_path / "a", "normal", 0, [0.5, 0.3, 0.20])
    _fake_run(tmp_path / "b", "normal", 1, [0.5, 0.3, 0.40], **{field: value})
    md = report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")[2]
    rows = [line for line in md.splitlines() if line.startswith("| normal |")]
    assert len(rows) == 2 and all(_row("\n".join([r]), "normal")[2] == "1" for r in rows)
    assert f"Differs from the other tables: {field}" in md


def test_settings_that_do_not_change_a_run_do_not_split_it(tmp_path: Path) -> None:
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20], threads=1, progress=True, device="cpu")
    _fake_run(tmp_path, "normal", 1, [0.5, 0.3, 0.22], threads=2, progress=False,
              device="cuda", decay_start=1)  # 1 and 1.0: an old run's int
    (tmp_path / "fashion-mnist-normal-s0" / "config.json").write_text(json.dumps(
        json.loads((tmp_path / "fashion-mnist-normal-s0" / "config.json").read_text())
        | {"decay_start": 1.0}))
    md = report([tmp_path], tmp_path / "rep")[2]
    assert _row(md, "normal")[2] == "2"


def test_the_same_folder_twice_counts_once(tmp_path: Path) -> None:
    f = _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])
    md = report([tmp_path, f, tmp_path / "." / f.name], tmp_path / "rep")[2]
    assert _row(md, "normal")[2] == "1"


def test_two_folders_with_the_same_variant_and_seed_are_refused(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", "normal", 0, [0.5, 0.3, 0.20])
    _fake_run(tmp_path / "b", "normal", 0, [0.5, 0.3, 0.20])
    with pytest.raises(WnormError, match="same variant and seed"):
        report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")


@pytest.mark.parametrize("exp", ["vae", "seq", "dqn"])
def test_the_classification_report_refuses_other_experiments(tmp_path: Path, exp: str) -> None:
    folder = tmp_path / f"{exp}-normal-s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"experiment": exp, "variant": "normal",
                                                    "seed": 0, "epochs": 1, "steps": 10}))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_error": 0.5,
                                                      "train_error": 0.5, "seconds": 1}) + "\n")
    with pytest.raises(WnormError, match="is a others run folder, not a classification run"):
        report([tmp_path], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_the_command_reports_each_kind_and_refuses_a_mix(tmp_path: Path, capsys) -> None:
    """``python -m experiments.report`` sends vae/seq/dqn runs to their report and refuses
    folders that mix kinds, naming both."""
    _other(tmp_path / "vae", "vae", "normal", 0, 2)
    _other(tmp_path / "vae", "vae", "weightnorm", 0, 2)
    assert main([str(tmp_path / "vae"), "--out", str(tmp_path / "rep")]) == 0
    assert "## Convolutional VAE" in (tmp_path / "rep" / "report.md").read_text()
    _fake_run(tmp_path / "cls", "normal", 0, [0.5, 0.3, 0.2])
    capsys.readouterr()
    assert main([str(tmp_path / "vae"), str(tmp_path / "cls"), "--out",
                 str(tmp_path / "rep2")]) == 2
    err = capsys.readouterr().err
    assert "mix kinds of run" in err and "classify in" in err and "others in" in err
    assert not (tmp_path / "rep2").exists()


def _other(root: Path, exp: str, variant: str, seed: int, n: int, epochs: int = 2,
           done: bool = True) -> Path:
    folder = root / f"{exp}-{variant}-s{seed}"
    folder.mkdir(parents=True)
    cfg = {"experiment": exp, "variant": variant, "seed": seed, "epochs": epochs,
           "channels": 4, "latent": 4, "blocks": 1, "batch_size": 10, "lr": 0.001,
           "init_examples": 10, "binarize": True, "log_every": 1, "out": str(root)}
    (folder / "config.json").write_text(json.dumps(cfg))
    rows = [{"epoch": i + 1, "train_neg_elbo": 300.0 - i, "test_neg_elbo": 300.0 - i - seed,
             "test_recon": 1.0, "test_kl": 1.0, "seconds": 1.0, "eval_seconds": 0.1,
             "steps": i + 1, "step_losses": [[i + 1, 300.0 - i]]} for i in range(n)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_others_report_leaves_incomplete_runs_out(tmp_path: Path) -> None:
    for seed in (0, 1):
        _other(tmp_path, "vae", "normal", seed, 2)
        _other(tmp_path, "vae", "weightnorm", seed, 2)
    cut = _other(tmp_path, "vae", "weightnorm", 2, 1)  # 1 of 2 epochs
    empty = _other(tmp_path, "vae", "normal", 3, 0)  # no metrics yet: listed, not dropped
    md = others_report([tmp_path], tmp_path / "rep")
    row = next(line for line in md.splitlines() if line.startswith("| weightnorm |"))
    assert row.split("|")[2].strip() == "2"  # two complete seeds
    assert f"`{cut}`: incomplete, 1 of 2 epochs" in md
    assert f"`{empty}`: incomplete, 0 of 2 epochs" in md


def test_others_report_counts_a_folder_once(tmp_path: Path) -> None:
    a = _other(tmp_path, "vae", "normal", 0, 2)
    _other(tmp_path, "vae", "weightnorm", 0, 2)
    md = others_report([tmp_path, a], tmp_path / "rep")
    row = next(line for line in md.splitlines() if line.startswith("| normal |"))
    assert row.split("|")[2].strip() == "1"


@pytest.mark.slow
def test_a_diverging_variant_does_not_stop_the_others(tmp_path: Path, capsys) -> None:
    """lr 1e3: normal diverges; the later variants still train; the log and metrics say so;
    the report shows it."""
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    assert classify_main(["--data-dir", str(data), "--variants", "normal,weightnorm",
                 "--seeds", "0", "--width", "0.04", "--batch-size", "10", "--init-examples",
                 "10", "--threads", "1", "--no-progress", "--device", "cpu", "--epochs", "2",
                 "--lr", "1e30", "--out", str(out)]) == 0
    for v in ("normal", "weightnorm"):
        folder = out / f"fashion-mnist-{v}-s0"
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["diverged"] is True
        assert "diverged" in (folder / "log.txt").read_text()
    assert "diverged" in capsys.readouterr().err
    md = report([out], tmp_path / "rep")[2]
    assert _row(md, "normal")[1] == "diverged" and _row(md, "weightnorm")[1] == "diverged"


def test_precision_splits_tables_and_old_runs_count_as_float32(tmp_path: Path) -> None:
    """A bf16 run never shares a table with a float32 one; a run from before precision was
    recorded shares one with a new CPU float32 run (that is how it ran)."""
    fp32 = {"params": "float32", "autocast": None, "tf32_matmul": None, "tf32_cudnn": None,
            "channels_last": False, "compile": "off"}
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.20])  # old: no precision recorded
    _fake_run(tmp_path, "normal", 1, [0.5, 0.3, 0.22], precision=fp32)
    _fake_run(tmp_path, "normal", 2, [0.5, 0.3, 0.24], precision=fp32 | {
        "autocast": "bfloat16", "tf32_matmul": True, "tf32_cudnn": True, "channels_last": True,
        "compile": "default"}, stack=3, procs=5)
    md = report([tmp_path], tmp_path / "rep")[2]
    rows = [line for line in md.splitlines() if line.startswith("| normal |")]
    assert sorted(_row(r, "normal")[2] for r in rows) == ["1", "2"]
    assert "Differs from the other tables: precision bfloat16 autocast, TF32 matmul on" in md
    assert "arithmetic: bfloat16 autocast, TF32 matmul on, cuDNN on, channels-last, " \
           "torch.compile (default)" in md
    assert "3 seeds trained as one network, up to 5 such processes sharing" in md


def test_the_verdict_names_the_best_variant_and_whether_the_gap_beats_the_spread(
        tmp_path: Path) -> None:
    for seed, (a, b, c) in enumerate([(0.20, 0.30, 0.33), (0.21, 0.31, 0.35),
                                      (0.22, 0.32, 0.34)]):  # (train = test error here)
        _fake_run(tmp_path, "batchnorm", seed, [0.6, 0.4, a])
        _fake_run(tmp_path, "normal", seed, [0.9, 0.6, b])
        _fake_run(tmp_path, "weightnorm", seed, [0.8, 0.44, c])
    md = report([tmp_path], tmp_path / "rep", target_error=45)[2]
    assert ("- Lowest final test error: **batchnorm**, 21.00 ± 1.00% over 3 seeds; next "
            "normal, 31.00 ± 1.00%: every seed of batchnorm is below every seed of "
            "normal.") in md
    assert ("- Final test error against normal: batchnorm lower with every seed; weightnorm "
            "higher with every seed.") in md
    assert ("- First to 45% training error (mean epochs over seeds): batchnorm (2), "
            "weightnorm (2), normal (3).") in md
    (tmp_path / "b").mkdir()
    for seed, (n, w) in enumerate([(0.30, 0.29), (0.31, 0.32), (0.32, 0.30)]):
        _fake_run(tmp_path / "b", "normal", seed, [0.9, 0.6, n])
        _fake_run(tmp_path / "b", "weightnorm", seed, [0.9, 0.6, w])
    md = report([tmp_path / "b"], tmp_path / "rep2")[2]
    assert "**weightnorm**, 30.33 ± 1.53% over 3 seeds; next normal, 31.00 ± 1.00%: their " \
           "seed ranges overlap: the gap is within seed-to-seed spread." in md
    assert "- Final test error against normal: weightnorm within the seeds' spread." in md


@pytest.mark.parametrize("config, why", [
    ({"experiment": "graph", "variant": "gcn"}, r"a graph run, which experiments\.report does "
                                                 r"not read; its own report: python -m "
                                                 r"experiments\.graph --report-only"),
    ({"kind": "norm-growth", "config": {}}, r"a norm-growth run, .*norm_growth --report-only"),
    ([1, 2], r"config\.json holds a list, not a run's config"),
    ({}, r"config\.json is not a run's config \(no \['dataset', 'epochs', 'variant'\]\)"),
])
def test_folders_the_report_cannot_read_are_one_line_errors(tmp_path: Path, capsys,
                                                            config: object, why: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(WnormError, match=why):
        report([tmp_path], tmp_path / "rep")
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    assert re.search(why, capsys.readouterr().err)


def _sweep_run(root: Path) -> Path:
    import torch

    from experiments.data import ImageData
    from experiments.lr_sweep import SweepConfig, train_one

    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    cfg = SweepConfig(hidden=4, depth=1, epochs=1, batch_size=10, init_examples=10,
                      out=str(root), threads=1, train_subset=None, test_subset=None)
    return train_one(cfg, ImageData("fake", x, y, x, y, "memory", "none"), echo=False)


@pytest.mark.parametrize("where", ["afile/rep", "dangling", "dangling/rep"])
@pytest.mark.parametrize("kind", ["classify", "lr-sweep", "others"])
def test_an_out_inside_a_file_or_through_a_dangling_symlink_is_a_one_line_error(
        tmp_path: Path, capsys, kind: str, where: str) -> None:
    """Each kind of report says it in one line naming the path (mkdir cannot make either),
    with exit status 2 and nothing written, instead of a traceback."""
    runs = tmp_path / "runs"
    if kind == "classify":
        _fake_run(runs, "normal", 0, [0.5, 0.3, 0.2])
    elif kind == "lr-sweep":
        _sweep_run(runs)
    else:
        _other(runs, "vae", "normal", 0, 2)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    capsys.readouterr()  # the sweep run's progress bar
    assert main([str(runs), "--out", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    bad = tmp_path / where.split("/")[0]
    what = ("is a file" if where.startswith("afile") else
            f"is a symlink to {tmp_path / 'nowhere'}, which does not exist")
    assert err == f"error: {bad} {what}; expected a folder for the report (--out)\n"
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert not (tmp_path / "nowhere").exists()


def test_runs_naming_a_file_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    # a run's metrics.jsonl named by mistake ended in run_folders' iterdir() traceback
    _fake_run(tmp_path / "runs", "normal", 0, [0.5, 0.3])
    metrics = next((tmp_path / "runs").glob("*/metrics.jsonl"))
    assert main([str(metrics), "--out", str(tmp_path / "rep")]) == 2
    assert capsys.readouterr().err == (
        f"error: report: {metrics} is a file; expected a run folder (with config.json) or a "
        "folder of run folders\n")


def test_every_variant_is_drawn_in_its_own_colour(tmp_path: Path, monkeypatch) -> None:
    """With 9 colours for 10 variants, arpit fell to matplotlib's first cycle colour and was
    drawn in weightnorm's blue in training_error.png."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from experiments.nets import VARIANTS

    for v in VARIANTS:
        _fake_run(tmp_path, v, 0, [0.5, 0.3, 0.2])
    figures: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig),
                                                                 save(fig, *a, **k)))
    report([tmp_path], tmp_path / "rep")
    for ax in figures[0].axes:
        colours = {line.get_label().split(" (")[0]: to_hex(line.get_color())
                   for line in ax.lines}
        assert set(colours) == set(VARIANTS)
        assert len(set(colours.values())) == len(VARIANTS), colours
