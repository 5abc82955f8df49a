"""experiments.lr_sweep: the learning-rate sweep writes run folders with per-step ||v||, marks diverged
runs instead of dropping them, and its report draws both plots and says what the data show."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from wnorm import WnormError
from experiments.data import ImageData
from experiments.lr_sweep import SweepConfig, main, train_one
from experiments.report import main as report_main
from experiments.report_sweep import load_sweep, report_sweep

from fakes import write_fashion


def _data(n: int = 60) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("fake", x, y, x[:20], y[:20], "memory", "none")


def _cfg(tmp_path: Path, **kw: object) -> SweepConfig:
    base = dict(hidden=8, depth=1, epochs=2, batch_size=20, init_examples=20, vnorm_every=1,
                out=str(tmp_path), threads=1, train_subset=None, test_subset=None)
    return SweepConfig(**(base | kw))  # type: ignore[arg-type]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_weightnorm_v_grows_under_sgd_and_forced_stays_flat(tmp_path: Path) -> None:
    """The section-2 mechanism, in the recorded numbers: with plain SGD every step is orthogonal
    to v, so ||v|| never shrinks and grows at a large lr; forced WN holds it at sqrt(fan-in)."""
    data = _data()
    wn = train_one(_cfg(tmp_path, variant="weightnorm", lr=1.0), data, echo=False)
    forced = train_one(_cfg(tmp_path, variant="forced", lr=1.0), data, echo=False)
    v_wn = [r["v_norm"] for r in _rows(wn / "vnorm.jsonl")]
    assert [r["step"] for r in _rows(wn / "vnorm.jsonl")] == list(range(1, 7))  # 3 steps x 2
    for layer in v_wn[0]:
        seq = [v[layer] for v in v_wn]
        assert all(b >= a * (1 - 1e-9) for a, b in zip(seq, seq[1:]))  # never shrinks
        assert seq[-1] > seq[0] * 1.01
    v_f = [r["v_norm"] for r in _rows(forced / "vnorm.jsonl")]
    for layer, fan_in in (("1", 64), ("3", 8)):
        assert all(math.isclose(v[layer], math.sqrt(fan_in), rel_tol=1e-5) for v in v_f)
    rows = _rows(wn / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and not any(r["diverged"] for r in rows)
    assert rows[-1]["v_norm"] == pytest.approx(sum(v_wn[-1].values()) / 2)
    config = json.loads((wn / "config.json").read_text())
    assert config["kind"] == "lr-sweep" and config["optimizer"] == "sgd"
    assert config["momentum"] == 0.0
    assert {"git_commit", "hardware"} <= set(json.loads((wn / "version.json").read_text()))
    assert "epoch 2/2" in (wn / "log.txt").read_text()


def test_a_diverged_run_is_recorded_and_reported_not_dropped(tmp_path: Path) -> None:
    data = _data()
    runs = tmp_path / "runs"
    bad = train_one(_cfg(runs, variant="normal", lr=1e30), data, echo=False)
    rows = _rows(bad / "metrics.jsonl")
    assert rows[-1]["diverged"] is True and rows[-1]["train_loss"] is None
    assert rows[-1]["diverged_step"] >= 1
    assert "diverged, stopping" in (bad / "log.txt").read_text()
    for lr in (0.01, 0.1):
        train_one(_cfg(runs, variant="normal", lr=lr), data, echo=False)
    md, pngs, text = report_sweep([runs], tmp_path / "rep", tolerance=10.0)
    assert [p.name for p in pngs] == ["final_loss_vs_lr.png"]  # no ||v|| for normal
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1e+30 | diverged (1/1) |" in text
    assert "diverged (NaN/inf loss, some seed) at 1 of 3 (1e+30)" in text
    assert "within 10 of it at 2 of 3 learning rates" in text
    assert md.read_text() == text


def test_adam_and_the_paper_convnet(tmp_path: Path) -> None:
    data = _data(40)
    data.x_train = torch.randn(40, 1, 28, 28)
    data.x_test = data.x_train[:20]
    f = train_one(_cfg(tmp_path, variant="weightnorm", lr=1e-3, optimizer="adam", model="paper",
                       width=0.05, epochs=1), data, echo=False)
    assert len(_rows(f / "vnorm.jsonl")[0]["v_norm"]) == 10  # 9 convs + dense
    with pytest.raises(WnormError, match="optimizer must be sgd or adam"):
        train_one(_cfg(tmp_path, optimizer="rmsprop"), data, echo=False)
    with pytest.raises(WnormError, match="not one of"):
        train_one(_cfg(tmp_path, variant="batchnorm"), data, echo=False)


@pytest.mark.slow
def test_lr_sweep_command_line_end_to_end(tmp_path: Path, capsys) -> None:
    data_dir, runs = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=40, n_test=20)
    argv = ["--data-dir", str(data_dir), "--variants", "normal,weightnorm,forced",
            "--lrs", "0.01,1", "--seeds", "0,1", "--epochs", "2", "--hidden", "8",
            "--batch-size", "20", "--init-examples", "20", "--threads", "1", "--no-progress",
            "--train-subset", "40", "--test-subset", "20", "--out", str(runs)]
    assert main(argv) == 0
    names = sorted(p.name for p in runs.iterdir())
    assert len(names) == 12 and "fashion-mnist-mlp-forced-sgd-lr0.01-s1" in names
    assert len(load_sweep([runs])) == 12
    capsys.readouterr()
    assert report_main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "v_norm.png").is_file()
    for v in ("normal", "weightnorm", "forced"):
        assert f"**{v}**:" in md
    assert "| lr | normal | weightnorm | forced |" in md
    assert "12 = 3 variants x 2 learning rates x 2 seeds" in md


def test_learning_rates_that_print_alike_are_refused_before_any_run(tmp_path: Path,
                                                                    capsys) -> None:
    # they shared one run folder: one run replaced the other, or the sweep stopped midway
    argv = ["--data-dir", str(tmp_path / "no-data"), "--variants", "normal", "--lrs",
            "0.01,0.0100000001", "--seeds", "0", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "would share the run folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_refuses_mixed_kinds(tmp_path: Path) -> None:
    train_one(_cfg(tmp_path / "a", variant="normal", lr=0.1), _data(), echo=False)
    other = tmp_path / "b" / "fashion-mnist-normal-s0"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"variant": "normal", "epochs": 1}))
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                        str(tmp_path / "o")]) == 2


def test_a_run_with_no_metrics_yet_is_listed_as_incomplete_not_a_blank_cell(
        tmp_path: Path) -> None:
    """As the other reports do: a run folder that holds no epoch yet (just started, or killed
    in its first epoch) is counted as incomplete, not dropped so that its cell reads blank."""
    data, runs = _data(), tmp_path / "runs"
    for variant in ("normal", "weightnorm"):
        train_one(_cfg(runs, variant=variant, lr=0.01), data, echo=False)
    train_one(_cfg(runs, variant="normal", lr=0.1), data, echo=False)
    started = train_one(_cfg(runs, variant="weightnorm", lr=0.1), data, echo=False)
    for name in ("metrics.jsonl", "vnorm.jsonl"):
        (started / name).write_text("")  # what RunFolder leaves before the first epoch ends
    md, pngs, text = report_sweep([runs], tmp_path / "rep")
    rows = [line for line in text.splitlines() if line.startswith("| 0.1 |")]
    assert len(rows) == 3  # training loss, test error, ||v|| growth
    assert all(row.endswith("| incomplete (1/1) |") for row in rows), rows
    assert "| 0.1 |  |" not in text and "|  |" not in text
    assert "Runs: 4 = 2 variants x 2 learning rates x 1 seed" in text


def test_report_with_one_learning_rate_says_its_v_growth_once(tmp_path: Path) -> None:
    """It read "x3.17 at lr 0.1, x3.17 at lr 0.1 (the largest lr ...)"."""
    train_one(_cfg(tmp_path / "runs", variant="weightnorm", lr=0.1), _data(), echo=False)
    text = report_sweep([tmp_path / "runs"], tmp_path / "rep")[2]
    line = next(s for s in text.split(". ") if "Mean ||v|| at the end / at the start" in s)
    assert line.count("at lr 0.1") == 1, line
    assert "(the only lr with a run that did not diverge)" in line
