"""Every experiment script refuses a bad option before it loads data or touches a folder: an
argparse error (exit status 2, the usage, and one line naming the option and what it
expects), never a traceback or a run that quietly does something else."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from fakes import write_fashion

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
    ("classify", ["--dataset", "mnist"], "--dataset must be one of"),
    ("classify", ["--seeds", "0,0"], "given twice"),
    ("classify", ["--variants", "normal,normal"], "given twice"),
    ("classify", ["--variants", "normal,batchnorm", "--batch-size", "1"],
     "--batch-size must be >= 2 for batchnorm"),
    ("classify", ["--variants", "normal,meanonly", "--train-subset", "1"],
     "--batch-size must be >= 2 for meanonly, whose batch statistics need 2 or more examples; "
     "got 1 (a batch is at most the training set: --train-subset 1)"),
    ("classify_gpu", ["--variants", "wn+meanonly", "--batch-size", "1"],
     "--batch-size must be >= 2 for wn+meanonly"),
    ("demo", ["--batch-size", "1"], "--batch-size must be >= 2 for batchnorm"),
    ("demo", ["--batch-size", "0"], "--batch-size must be"),
    ("demo", ["--seeds", "0,0"], "given twice"),
    ("demo", ["--procs", "0"], "--procs must be an integer >= 1"),
    ("classify_gpu", ["--compile", "fast"], "--compile must be one of"),
    ("classify_gpu", ["--progress", "--procs", "2"], "pass --procs 1 with --progress"),
    ("demo", ["--progress"], "pass --procs 1 with --progress"),
    ("classify_gpu", ["--stack", "0"], "--stack must be an integer >= 1"),
    ("classify_gpu", ["--variants", "arpit"], "cannot be trained here"),
    ("classify_gpu", ["--timing-rounds", "0"], "--timing-rounds must be"),
    ("lr_sweep", ["--batch-size", "0"], "--batch-size must be"),
    ("lr_sweep", ["--epochs", "0"], "--epochs must be"),
    ("lr_sweep", ["--lrs", "0.1,0.1"], "given twice"),
    ("lr_sweep", ["--lrs", "0.1,-1"], "--lrs: learning rates must be finite and > 0"),
    ("lr_sweep", ["--optimizer", "rmsprop"], "--optimizer must be sgd or adam"),
    ("vae", ["--batch-size", "0"], "--batch-size must be"),
    ("vae", ["--log-every", "0"], "--log-every must be"),
    ("vae", ["--seeds", "1,1"], "given twice"),
    ("seq", ["--batch-size", "0"], "--batch-size must be"),
    ("seq", ["--threads", "0"], "--threads must be"),
    ("dqn", ["--train-every", "0"], "--train-every must be"),
    ("dqn", ["--buffer", "0"], "--buffer must be"),
    ("dqn", ["--buffer", "1"], "holds fewer transitions than a batch"),
    ("dqn", ["--envs", ","], "--envs: expected at least one value"),
    ("dqn", ["--envs", "CartPole-v1,CartPole-v1"], "given twice"),
    ("report", ["--target-error", "100"], "--target-error must be a percentage in (0, 100)"),
    ("report", ["--target-error", "nan"], "--target-error must be a percentage in (0, 100)"),
    ("report", ["--tolerance", "-1"], "--tolerance must be a finite number >= 0"),
]


def _main(script: str, argv: list[str]) -> int:
    """Exit status of ``python -m experiments.<script> argv`` (argparse exits, main returns)."""
    try:
        return importlib.import_module(f"experiments.{script}").main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("script,extra,message", _BAD,
                         ids=[f"{c} {' '.join(e)}" for c, e, _ in _BAD])
def test_bad_option_is_an_argparse_error_before_anything_runs(
        tmp_path: Path, capsys, script: str, extra: list[str], message: str) -> None:
    out = tmp_path / "out"
    argv = [*extra, "--out", str(out)]
    if script == "report":
        argv = [str(tmp_path), *argv]
    elif script != "dqn":
        argv += ["--data-dir", str(tmp_path / "no-data")]  # data would fail with another message
    assert _main(script, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("usage: ") and "error: " in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["classify", "classify_gpu", "vae", "lr_sweep"])
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys, script: str) -> None:
    assert _main(script, ["--device", "cuda", "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,size", [("--train-subset", 100000), ("--test-subset", 11)])
def test_a_subset_larger_than_the_dataset_names_the_option_and_size(
        tmp_path: Path, capsys, option: str, size: int) -> None:
    data = tmp_path / "fashion"
    write_fashion(data, n_train=20, n_test=10)
    assert _main("classify", ["--data-dir", str(data), option, str(size), "--variants",
                              "normal", "--epochs", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    n = 20 if option == "--train-subset" else 10
    assert f"{option} {size} is more than the {n} examples" in err
    assert err.startswith("error: ")  # found once the data is read: not an option error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_variants_with_spaces_work_in_every_script(tmp_path: Path) -> None:
    data = tmp_path / "fashion"
    write_fashion(data, n_train=20, n_test=10)
    assert _main("classify", ["--data-dir", str(data), "--variants", "normal, weightnorm",
                              "--seeds", "0, 1", "--epochs", "1", "--width", "0.04",
                              "--batch-size", "10", "--init-examples", "10", "--threads", "1",
                              "--no-progress", "--device", "cpu",
                              "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").iterdir())) == 4
    assert _main("vae", ["--quick", "--variants", "normal, weightnorm", "--seeds", " 0",
                         "--epochs", "1", "--data-dir", str(data), "--train-subset", "20",
                         "--test-subset", "10", "--batch-size", "10", "--init-examples", "10",
                         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "v")]) == 0
    assert len(list((tmp_path / "v").iterdir())) == 2


@pytest.mark.slow
def test_long_runs_show_progress_bars(tmp_path: Path, capsys) -> None:
    """seq and lr_sweep draw a bar per epoch on stderr, as classify does; --no-progress turns
    it off."""
    data = tmp_path / "fashion"
    write_fashion(data, n_train=20, n_test=10)
    small = ["--epochs", "1", "--data-dir", str(data), "--train-subset", "20", "--test-subset",
             "10", "--batch-size", "10", "--init-examples", "10", "--device", "cpu"]
    assert _main("seq", ["--quick", "--variants", "normal", "--seeds", "0", *small,
                         "--out", str(tmp_path / "s")]) == 0
    assert "seq normal s0 1/1" in capsys.readouterr().err
    assert _main("lr_sweep", ["--variants", "normal", "--lrs", "0.1", "--seeds", "0",
                              "--hidden", "4", *small, "--out", str(tmp_path / "w")]) == 0
    assert "normal lr 0.1 s0 1/1" in capsys.readouterr().err
    assert _main("lr_sweep", ["--variants", "normal", "--lrs", "0.1", "--seeds", "0",
                              "--hidden", "4", *small, "--no-progress",
                              "--out", str(tmp_path / "w2")]) == 0
    captured = capsys.readouterr()
    assert "normal lr 0.1 s0 1/1" not in captured.err and "epoch 1/1" in captured.out


@pytest.mark.slow
def test_classify_gpu_and_the_demo_honour_progress(tmp_path: Path, capsys) -> None:
    data = tmp_path / "fashion"
    write_fashion(data, n_train=20, n_test=10)
    small = ["--epochs", "1", "--data-dir", str(data), "--width", "0.04", "--batch-size", "10",
             "--init-examples", "10", "--device", "cpu", "--procs", "1", "--seeds", "0",
             "--eval-batch-size", "10", "--variants", "normal"]
    assert _main("classify_gpu", [*small, "--progress", "--out", str(tmp_path / "g")]) == 0
    assert "normal s0 1/1" in capsys.readouterr().err
    assert _main("classify_gpu", [*small, "--out", str(tmp_path / "h")]) == 0  # off by default
    assert "normal s0 1/1" not in capsys.readouterr().err
    assert _main("demo", [*small, "--train-subset", "20", "--test-subset", "10", "--progress",
                          "--out", str(tmp_path / "d")]) == 0
    assert "normal s0 1/1" in capsys.readouterr().err
