"""Every repro subcommand refuses a bad option before it loads data or touches a folder: exit
status 2 and one line naming the option and what it expects, never a traceback or a run that
quietly does something else."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from wnorm.repro.__main__ import main

from test_repro_datasets import _write_fashion

_BAD = [
    ("classify", ["--batch-size", "0"], "--batch-size must be an integer >= 1; got 0"),
    ("classify", ["--batch-size", "-10"], "--batch-size must be"),
    ("classify", ["--epochs", "0"], "--epochs must be an integer >= 1; got 0"),
    ("classify", ["--epochs", "-3"], "--epochs must be"),
    ("classify", ["--eval-batch-size", "0"], "--eval-batch-size must be"),
    ("classify", ["--lr", "-1"], "--lr must be a finite number > 0"),
    ("classify", ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("classify", ["--dropout", "2"], "--dropout must be in [0, 1)"),
    ("classify", ["--noise", "-1"], "--noise must be"),
    ("classify", ["--decay-start", "-5"], "--decay-start must be"),
    ("classify", ["--threads", "0"], "--threads must be"),
    ("classify", ["--threads", "-1"], "--threads must be"),
    ("classify", ["--width", "-1"], "--width must be"),
    ("classify", ["--train-subset", "0"], "--train-subset must be"),
    ("classify", ["--variants", "normal,nope"], "--variants: unknown ['nope']"),
    ("demo", ["--batch-size", "0"], "--batch-size must be"),
    ("lr-sweep", ["--batch-size", "0"], "--batch-size must be"),
    ("lr-sweep", ["--epochs", "0"], "--epochs must be"),
    ("vae", ["--batch-size", "0"], "--batch-size must be"),
    ("vae", ["--log-every", "0"], "--log-every must be"),
    ("seq", ["--batch-size", "0"], "--batch-size must be"),
    ("seq", ["--threads", "0"], "--threads must be"),
    ("dqn", ["--train-every", "0"], "--train-every must be"),
    ("dqn", ["--buffer", "0"], "--buffer must be"),
    ("dqn", ["--envs", ","], "--envs: expected at least one value"),
]


@pytest.mark.parametrize("command,extra,message", _BAD,
                         ids=[f"{c} {' '.join(e)}" for c, e, _ in _BAD])
def test_bad_option_is_a_clear_error_before_anything_runs(tmp_path: Path, capsys, command: str,
                                                          extra: list[str], message: str) -> None:
    out = tmp_path / "out"
    argv = [command, *extra, "--out", str(out)]
    if command != "dqn":
        argv += ["--data-dir", str(tmp_path / "no-data")]  # data would fail with another message
    else:
        argv += ["--quick"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["classify", "vae", "lr-sweep"])
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys, command: str) -> None:
    assert main([command, "--device", "cuda", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "0", "100", "-5", "inf"])
def test_report_target_error_must_be_a_percentage(tmp_path: Path, capsys, value: str) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--target-error",
                 value]) == 2
    assert "--target-error must be a percentage in (0, 100)" in capsys.readouterr().err


@pytest.mark.parametrize("option,size", [("--train-subset", 100000), ("--test-subset", 11)])
def test_a_subset_larger_than_the_dataset_names_the_option_and_size(
        tmp_path: Path, capsys, option: str, size: int) -> None:
    data = tmp_path / "fashion"
    _write_fashion(data, n_train=20, n_test=10)
    assert main(["classify", "--data-dir", str(data), option, str(size), "--variants", "normal",
                 "--epochs", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    n = 20 if option == "--train-subset" else 10
    assert f"{option} {size} is more than the {n} examples" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_variants_with_spaces_work_in_every_subcommand(tmp_path: Path) -> None:
    from wnorm.repro import vae

    data = tmp_path / "fashion"
    _write_fashion(data, n_train=20, n_test=10)
    assert main(["classify", "--data-dir", str(data), "--variants", "normal, weightnorm",
                 "--seeds", "0, 1", "--epochs", "1", "--width", "0.04", "--batch-size", "10",
                 "--init-examples", "10", "--threads", "1", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").iterdir())) == 4
    p = argparse.ArgumentParser()
    vae.add_arguments(p)
    args = p.parse_args(["--quick", "--variants", "normal, weightnorm", "--seeds", " 0",
                         "--epochs", "1", "--data-dir", str(data), "--train-subset", "20",
                         "--test-subset", "10", "--batch-size", "10", "--init-examples", "10",
                         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "v")])
    assert vae.run(args) == 0


@pytest.mark.slow
def test_long_runs_show_progress_bars(tmp_path: Path, capsys) -> None:
    """vae/seq/dqn/lr-sweep draw a bar per epoch (or run) on stderr, as classify does;
    --no-progress turns it off."""
    data = tmp_path / "fashion"
    _write_fashion(data, n_train=20, n_test=10)
    small = ["--epochs", "1", "--data-dir", str(data), "--train-subset", "20", "--test-subset",
             "10", "--batch-size", "10", "--init-examples", "10", "--device", "cpu"]
    assert main(["seq", "--quick", "--variants", "normal", "--seeds", "0", *small,
                 "--out", str(tmp_path / "s")]) == 0
    assert "seq normal s0 1/1" in capsys.readouterr().err
    assert main(["lr-sweep", "--variants", "normal", "--lrs", "0.1", "--seeds", "0", "--hidden",
                 "4", *small, "--out", str(tmp_path / "w")]) == 0
    assert "normal lr 0.1 s0 1/1" in capsys.readouterr().err
    assert main(["lr-sweep", "--variants", "normal", "--lrs", "0.1", "--seeds", "0", "--hidden",
                 "4", *small, "--no-progress", "--out", str(tmp_path / "w2")]) == 0
    captured = capsys.readouterr()
    assert "normal lr 0.1 s0 1/1" not in captured.err and "epoch 1/1" in captured.out
