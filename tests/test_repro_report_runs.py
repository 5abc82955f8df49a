"""The reports count only complete runs, show diverged and unfinished ones for what they are,
never merge runs of different settings or count one run twice, and refuse folders that are
not theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wnorm import WnormError
from wnorm.repro.__main__ import main
from wnorm.repro.report import report

from test_repro_datasets import _write_fashion


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


def test_repeated_seeds_or_variants_are_refused(tmp_path: Path, capsys) -> None:
    for argv in (["demo", "--seeds", "0,0"], ["classify", "--variants", "normal,normal"],
                 ["lr-sweep", "--lrs", "0.1,0.1"], ["vae", "--seeds", "1,1"],
                 ["dqn", "--envs", "CartPole-v1,CartPole-v1"]):
        assert main(argv + ["--out", str(tmp_path / "x")]) == 2
        assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("exp", ["vae", "seq", "dqn"])
def test_report_refuses_other_experiments(tmp_path: Path, exp: str, capsys) -> None:
    folder = tmp_path / f"{exp}-normal-s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"experiment": exp, "variant": "normal",
                                                    "seed": 0, "epochs": 1, "steps": 10}))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_error": 0.5,
                                                      "train_error": 0.5, "seconds": 1}) + "\n")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "others-report" in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()


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
    from wnorm.repro.others_report import report as others_report

    for seed in (0, 1):
        _other(tmp_path, "vae", "normal", seed, 2)
        _other(tmp_path, "vae", "weightnorm", seed, 2)
    cut = _other(tmp_path, "vae", "weightnorm", 2, 1)  # 1 of 2 epochs
    md = others_report([tmp_path], tmp_path / "rep")
    row = next(line for line in md.splitlines() if line.startswith("| weightnorm |"))
    assert row.split("|")[2].strip() == "2"  # two complete seeds
    assert f"`{cut}`: incomplete, 1 of 2 epochs" in md


def test_others_report_counts_a_folder_once(tmp_path: Path) -> None:
    from wnorm.repro.others_report import report as others_report

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
    _write_fashion(data, n_train=20, n_test=10)
    assert main(["classify", "--data-dir", str(data), "--variants", "normal,weightnorm",
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
