"""experiments.classify end to end: the command line trains every variant (the paper's five and
the four relatives) for two tiny epochs on fake Fashion-MNIST files, writes valid run folders,
and the report turns them into a PNG and a table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.classify import main
from experiments.nets import RELATIVES, VARIANTS
from experiments.report import main as report_main
from experiments.report import report

from fakes import write_fashion

pytestmark = pytest.mark.slow


def test_every_variant_trains_and_reports(tmp_path: Path, capsys) -> None:
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=40, n_test=20)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(data_dir),
            "--variants", ",".join(VARIANTS), "--seeds", "0,1", "--epochs", "2",
            "--width", "0.04", "--batch-size", "20", "--init-examples", "20",
            "--threads", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [f.name for f in folders] == sorted(f"fashion-mnist-{v}-s{s}" for v in VARIANTS
                                               for s in (0, 1))
    for f in folders:
        config = json.loads((f / "config.json").read_text())
        assert config["epochs"] == 2 and config["decay_start"] == 1 and config["zca"] is False
        assert config["data"]["train"] == 40
        assert config["precision"] == {"params": "float32", "autocast": None, "tf32_matmul": None,
                                       "tf32_cudnn": None, "channels_last": False,
                                       "compile": "off"}
        version = json.loads((f / "version.json").read_text())
        assert {"git_commit", "wnorm", "torch", "hardware"} <= set(version)
        rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        for r in rows:
            assert 0 <= r["train_error"] <= 1 and 0 <= r["test_error"] <= 1
            assert r["seconds"] > 0 and r["train_loss"] > 0
        assert rows[1]["beta1"] == 0.5 and rows[0]["beta1"] == 0.9
        assert "epoch 2/2" in (f / "log.txt").read_text()

    capsys.readouterr()
    assert report_main([str(out), "--out", str(tmp_path / "rep"), "--target-error", "95"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    png = (tmp_path / "rep" / "training_error.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for v in VARIANTS:
        assert f"| {v} |" in md
    assert "| 2 |" in md  # two seeds per variant
    assert "8.43" in md and "7.31" in md  # the paper's Table 1 beside the runs
    assert set(RELATIVES) <= set(VARIANTS)
    for v in RELATIVES:  # no paper figure for the relatives: their column is empty
        row = next(line for line in md.splitlines() if line.startswith(f"| {v} |"))
        assert row.split("|")[4].strip() == ""
    assert "no data-dependent init" in (out / "fashion-mnist-ws+gn-s0" / "log.txt").read_text()
    assert "without data" in (out / "fashion-mnist-arpit-s0" / "log.txt").read_text()
    assert "epochs to 95% train error" in md
    assert "training error: weightnorm" in md  # the WN-vs-normal sentence, from the data
    assert "width 0.04" in md and "2 epochs" in md
    assert "- Lowest final test error: **" in md and "- First to 95% training error" in md


@pytest.mark.parametrize("module", ["classify", "classify_gpu"])
def test_the_config_records_the_init_batch_that_ran_not_a_larger_request(tmp_path: Path,
                                                                         module: str) -> None:
    # 500 examples asked of a 40-example training set: 40 ran, and the report must say 40
    import importlib

    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=40, n_test=20)
    run = importlib.import_module(f"experiments.{module}").main
    extra = ["--procs", "1", "--eval-batch-size", "20"] if module == "classify_gpu" else []
    assert run(["--data-dir", str(data_dir), "--variants", "weightnorm", "--seeds", "0",
                "--epochs", "1", "--width", "0.04", "--batch-size", "20", "--threads", "1",
                "--no-progress", "--device", "cpu", "--out", str(out), *extra]) == 0
    folder = out / "fashion-mnist-weightnorm-s0"
    assert json.loads((folder / "config.json").read_text())["init_examples"] == 40
    assert "data init on 40 examples" in (folder / "log.txt").read_text()


@pytest.mark.parametrize("module", ["classify", "classify_gpu"])
def test_the_config_records_the_batch_that_ran_not_a_larger_request(tmp_path: Path,
                                                                     module: str) -> None:
    # batches of 40 ran while config.json and the report said 100
    import importlib

    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=40, n_test=20)
    run = importlib.import_module(f"experiments.{module}").main
    extra = ["--procs", "1", "--eval-batch-size", "20"] if module == "classify_gpu" else []
    assert run(["--data-dir", str(data_dir), "--variants", "normal", "--seeds", "0",
                "--epochs", "1", "--width", "0.04", "--batch-size", "100", "--threads", "1",
                "--init-examples", "20", "--no-progress", "--device", "cpu", "--out", str(out),
                *extra]) == 0
    config = json.loads((out / "fashion-mnist-normal-s0" / "config.json").read_text())
    assert config["batch_size"] == 40
    if module == "classify_gpu":  # and the plan beside them
        plan = json.loads((out / "harness.json").read_text())["plan"]
        assert plan["steps_per_epoch"] == 1


def test_report_rejects_empty_folder(tmp_path: Path) -> None:
    from wnorm import WnormError

    with pytest.raises(WnormError, match="no run folder"):
        report([tmp_path], tmp_path / "out")
    assert report_main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_missing_dataset_is_a_clean_cli_error(tmp_path: Path, capsys) -> None:
    code = main(["--data-dir", str(tmp_path), "--epochs", "1", "--no-download",
                 "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def _fake_run(root: Path, variant: str, seed: int, train_errors: list[float]) -> None:
    folder = root / f"fashion-mnist-{variant}-s{seed}"
    folder.mkdir(parents=True)
    config = {"dataset": "fashion-mnist", "variant": variant, "seed": seed,
              "epochs": len(train_errors), "width": 0.125, "train_subset": 100,
              "test_subset": None, "zca": False, "batch_size": 10, "lr": 0.001, "beta1": 0.9,
              "beta1_late": 0.5, "beta2": 0.999, "decay_start": 1, "init_examples": 10,
              "data": {"source": "fake", "train": 100, "test": 50, "preprocessing": "none"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "version.json").write_text(json.dumps({"git_commit": "0" * 40, "wnorm": "0",
                                                     "torch": "0", "hardware": "cpu"}))
    rows = [{"epoch": i + 1, "train_error": e, "test_error": e, "train_loss": 1.0,
             "test_loss": 1.0, "seconds": 1.0, "eval_seconds": 0.1}
            for i, e in enumerate(train_errors)]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def test_report_says_how_many_seeds_missed_the_target(tmp_path: Path) -> None:
    """A variant whose seed-mean curve reaches the target error while one seed does not: the
    sentence names the seeds that missed it, rather than 'normal did not'."""
    _fake_run(tmp_path, "normal", 0, [0.5, 0.3, 0.18])
    _fake_run(tmp_path, "normal", 1, [0.5, 0.25, 0.15])
    _fake_run(tmp_path, "weightnorm", 0, [0.4, 0.16, 0.10])
    _fake_run(tmp_path, "weightnorm", 1, [0.4, 0.17, 0.12])
    md = report([tmp_path], tmp_path / "rep", target_error=17)[2]
    assert "| normal |" in md and "not reached by 1 of 2 seeds" in md
    assert ("17% training error: weightnorm reached it with every seed (2 epochs on average); "
            "normal missed it with 1 of 2 seeds.") in md
