"""``--resume``: an interrupted command goes on where it stopped. Finished runs (``done.json``)
are kept byte for byte, the interrupted one is trained again from its start, and a finished
run of another setting is refused, not mixed into a report."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from experiments.common import DONE, RunFolder, pending
from fakes import write_fashion
from wnorm import WnormError

_TINY = ["--width", "0.04", "--batch-size", "10", "--init-examples", "10", "--threads", "1",
         "--device", "cpu", "--epochs", "2"]


def main(argv: list[str]) -> int:
    try:
        return importlib.import_module(f"experiments.{argv[0]}").main(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _run_interrupted(argv: list[str], monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Run ``argv`` with Ctrl-C right after the first epoch a run folder ending in ``suffix``
    writes."""
    write = RunFolder.write

    def interrupted(self: RunFolder, row: dict) -> None:
        write(self, row)
        if self.path.name.endswith(suffix):
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.undo()


@dataclasses.dataclass
class _Cfg:
    out: str = "runs"
    threads: int = 1
    lr: float = 0.1
    batch_size: int = 100
    zca: bool | None = None  # None: True (as classify's cifar10)
    train_subset: int | None = None  # None: the whole set

    def resolved(self) -> _Cfg:
        return dataclasses.replace(self, zca=True if self.zca is None else self.zca)


def _finished(folder: Path, train: int = 20, **ran: object) -> None:
    with RunFolder(folder, _Cfg(**ran).resolved(), "cpu", {"data": {"train": train}},
                   echo=False) as rf:
        rf.write({"epoch": 1})


def test_a_run_folder_is_marked_done_only_when_its_training_returns(tmp_path: Path) -> None:
    _finished(tmp_path / "a")
    assert (tmp_path / "a" / DONE).is_file()
    with pytest.raises(KeyboardInterrupt), RunFolder(tmp_path / "b", _Cfg(), "cpu",
                                                     echo=False) as rf:
        rf.write({"epoch": 1})
        raise KeyboardInterrupt
    assert (tmp_path / "b" / "metrics.jsonl").read_text() and not (tmp_path / "b" / DONE).exists()
    # a finished folder trained again is unfinished until that run ends
    rf = RunFolder(tmp_path / "a", _Cfg(), "cpu", echo=False, overwrite=True)
    assert not (tmp_path / "a" / DONE).exists()
    rf.close()


def test_pending_keeps_finished_runs_of_the_same_setting_and_refuses_another(
        tmp_path: Path) -> None:
    _finished(tmp_path / "a", batch_size=20, zca=True)  # clamped to the data, auto resolved
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"epoch": 1}\n')  # interrupted: no done.json
    cfgs = [_Cfg(out="a", threads=2), _Cfg(out="b"), _Cfg(out="c")]
    where = lambda c: tmp_path / c.out  # noqa: E731
    assert pending(cfgs, where, overwrite=False, resume=True) == cfgs[1:]
    with pytest.raises(WnormError, match="already holds a run"):
        pending(cfgs, where, overwrite=False, resume=False)
    assert pending(cfgs, where, overwrite=True, resume=False) == cfgs
    with pytest.raises(WnormError, match="pass one"):
        pending(cfgs, where, overwrite=True, resume=True)
    with pytest.raises(WnormError) as e:
        pending([_Cfg(out="a", lr=0.5)], where, overwrite=False, resume=True)
    assert str(tmp_path / "a") in str(e.value) and "--lr 0.1 there, 0.5 now" in str(e.value)
    with pytest.raises(WnormError, match="--batch-size 20 there, 10 now"):
        pending([_Cfg(out="a", batch_size=10)], where, overwrite=False, resume=True)


def test_resume_refuses_a_finished_run_whose_option_is_omitted_now(tmp_path: Path) -> None:
    """An option not given means its default, not "whatever the run had": a run trained on a
    subset, or with another value than the default resolves to, is another setting."""
    where = lambda c: tmp_path / c.out  # noqa: E731
    _finished(tmp_path / "sub", train_subset=300, zca=True)
    with pytest.raises(WnormError, match="--train-subset 300 there, not given now"):
        pending([_Cfg(out="sub")], where, overwrite=False, resume=True)
    _finished(tmp_path / "nozca", zca=False)
    with pytest.raises(WnormError, match="--zca False there, True now"):
        pending([_Cfg(out="nozca")], where, overwrite=False, resume=True)
    assert pending([_Cfg(out="nozca", zca=False)], where, overwrite=False, resume=True) == []


def test_resume_compares_the_gpu_harness_defaults_resolved(tmp_path: Path) -> None:
    from experiments.classify import run_dir_name
    from experiments.classify_gpu import GPUConfig

    where = lambda c: tmp_path / run_dir_name(c)  # noqa: E731
    ran = GPUConfig(device="cpu", out=str(tmp_path), bf16=True, decay_start=0.0).resolved()
    with RunFolder(where(ran), ran, "cpu", {"data": {"train": 20}}, echo=False) as rf:
        rf.write({"epoch": 1})
    now = GPUConfig(device="cpu", out=str(tmp_path), bf16=True)
    with pytest.raises(WnormError, match="--decay-start 0.0 there, 15.0 now"):
        pending([now], where, overwrite=False, resume=True)
    with pytest.raises(WnormError, match="--bf16 True there, False now"):
        pending([dataclasses.replace(now, bf16=None, decay_start=0.0)], where,
                overwrite=False, resume=True)
    assert pending([dataclasses.replace(now, decay_start=0.0, channels_last=False)], where,
                   overwrite=False, resume=True) == []


@pytest.mark.slow
def test_classify_resume_refuses_options_omitted_this_time(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["classify", "--data-dir", str(data), "--variants", "normal", "--seeds", "0",
            *_TINY, "--out", str(out)]
    assert main(argv + ["--train-subset", "15", "--zca", "--decay-start", "0"]) == 0
    capsys.readouterr()
    assert main(argv + ["--variants", "normal,weightnorm", "--resume"]) == 2
    err = capsys.readouterr().err
    for what in ("--train-subset 15 there, not given now", "--zca True there, False now",
                 "--decay-start 0.0 there, 1.0 now"):
        assert what in err
    assert not (out / "fashion-mnist-weightnorm-s0").exists()


def test_resume_keeps_a_batch_clamped_to_the_training_set_and_refuses_a_smaller_one_asked_for(
        tmp_path: Path) -> None:
    where = lambda c: tmp_path / c.out  # noqa: E731
    _finished(tmp_path / "whole", train=20, batch_size=20)  # asked for more: ran as the set
    assert pending([_Cfg(out="whole", batch_size=500)], where, overwrite=False, resume=True) == []
    _finished(tmp_path / "asked", train=1000, batch_size=20)  # asked for 20 of 1000 examples
    with pytest.raises(WnormError, match="--batch-size 20 there, 500 now"):
        pending([_Cfg(out="asked", batch_size=500)], where, overwrite=False, resume=True)


@pytest.mark.slow
def test_classify_resumes_an_interrupted_command(tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["classify", "--data-dir", str(data), "--variants", "normal", "--seeds", "0,1",
            *_TINY, "--out", str(out)]
    _run_interrupted(argv, monkeypatch, "-s1")
    s0, s1 = out / "fashion-mnist-normal-s0", out / "fashion-mnist-normal-s1"
    assert (s0 / DONE).is_file() and not (s1 / DONE).exists()
    assert len((s1 / "metrics.jsonl").read_text().splitlines()) == 1
    kept = _snapshot(s0)
    assert main(argv) == 2  # without --resume the interrupted folder is still refused
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "1 of 2 runs finished already" in capsys.readouterr().out
    assert _snapshot(s0) == kept
    assert [r["epoch"] for r in map(json.loads, (s1 / "metrics.jsonl").read_text().splitlines())
            ] == [1, 2] and (s1 / DONE).is_file()
    both = {f: _snapshot(f) for f in (s0, s1)}
    assert main(argv + ["--resume"]) == 0  # all finished: nothing trains
    assert {f: _snapshot(f) for f in (s0, s1)} == both
    capsys.readouterr()
    assert main(argv + ["--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert str(s0) in err and "--epochs 2 there, 3 now" in err
    assert main(argv + ["--resume", "--overwrite"]) == 2
    assert {f: _snapshot(f) for f in (s0, s1)} == both


@pytest.mark.slow
def test_classify_gpu_resumes_its_stacks_and_records_the_runs_it_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["classify_gpu", "--data-dir", str(data), "--variants", "normal,weightnorm",
            "--seeds", "0", "--width", "0.04", "--batch-size", "10", "--init-examples", "10",
            "--epochs", "2", "--device", "cpu", "--procs", "1", "--eval-batch-size", "10",
            "--out", str(out)]
    _run_interrupted(argv, monkeypatch, "weightnorm-s0")
    normal, wn = out / "fashion-mnist-normal-s0", out / "fashion-mnist-weightnorm-s0"
    assert (normal / DONE).is_file() and not (wn / DONE).exists()
    assert "stopped in" in (wn / "log.txt").read_text()
    kept = _snapshot(normal)
    assert main(argv + ["--resume"]) == 0
    assert _snapshot(normal) == kept and (wn / DONE).is_file()
    harness = json.loads((out / "harness.json").read_text())
    assert harness["kept"] == [normal.name] and harness["stacks"] == ["weightnorm s0"]
    assert "| weightnorm |" in (out / "report" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["vae", "lr_sweep", "graph"])
def test_every_run_script_resumes_an_interrupted_command(
        script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=200 if script == "graph" else 20, n_test=10)
    argv = {
        "vae": ["vae", "--quick", "--variants", "normal", "--seeds", "0,1", "--epochs", "1",
                "--train-subset", "20", "--test-subset", "10", "--batch-size", "10",
                "--init-examples", "10", "--device", "cpu", "--no-progress"],
        "lr_sweep": ["lr_sweep", "--variants", "normal", "--lrs", "0.1", "--seeds", "0,1",
                     "--epochs", "1", "--hidden", "4", "--batch-size", "10",
                     "--init-examples", "10", "--threads", "1", "--no-progress",
                     "--train-subset", "20", "--test-subset", "10"],
        "graph": ["graph", "--quick", "--models", "sage", "--variants", "normal",
                  "--seeds", "0,1", "--device", "cpu"],
    }[script] + ["--data-dir", str(data), "--out", str(out)]
    _run_interrupted(argv, monkeypatch, "s1")
    done = {f.name: _snapshot(f) for f in out.iterdir() if (f / DONE).is_file()}
    cut = [f for f in out.iterdir() if f.is_dir() and not (f / DONE).exists()]
    assert len(done) == 1 and len(cut) == 1
    assert main(argv + ["--resume"]) == 0
    assert {f: _snapshot(out / f) for f in done} == done
    assert (cut[0] / DONE).is_file()
