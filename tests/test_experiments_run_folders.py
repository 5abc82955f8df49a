"""Run folders are never silently overwritten or mixed: a second run into the same folder is
refused (naming it) unless --overwrite, a bad option is refused before the folder is touched,
and the demo, which replaces its own earlier runs, runs twice in a row."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from fakes import write_fashion

pytestmark = pytest.mark.slow

_TINY = ["--width", "0.04", "--batch-size", "10", "--init-examples", "10", "--threads", "1",
         "--no-progress", "--device", "cpu", "--epochs", "1"]


def main(argv: list[str]) -> int:
    """Exit status of ``python -m experiments.<argv[0]> argv[1:]``."""
    try:
        return importlib.import_module(f"experiments.{argv[0]}").main(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)


def _classify(data: Path, out: Path, *extra: str) -> int:
    return main(["classify", "--data-dir", str(data), "--variants", "normal", "--seeds", "0",
                 *_TINY, "--out", str(out), *extra])


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_classify_refuses_a_folder_with_a_run_and_keeps_it_intact(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    assert _classify(data, out) == 0
    folder = out / "fashion-mnist-normal-s0"
    before = _snapshot(folder)
    capsys.readouterr()
    assert _classify(data, out, "--lr", "0.5") == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(folder) == before
    # a failing invocation (a bad --width) does not touch it either, even with --overwrite
    assert _classify(data, out, "--width", "-1", "--overwrite") == 2
    assert "--width must be" in capsys.readouterr().err
    assert _snapshot(folder) == before
    # --epochs 0 used to empty metrics.jsonl
    assert _classify(data, out, "--epochs", "0", "--overwrite") == 2
    assert _snapshot(folder) == before
    # asked for, it is replaced
    assert _classify(data, out, "--lr", "0.5", "--overwrite") == 0
    assert json.loads((folder / "config.json").read_text())["lr"] == 0.5


def test_multi_variant_classify_checks_every_folder_before_training(tmp_path: Path) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    assert _classify(data, out) == 0  # normal s0 exists
    assert main(["classify", "--data-dir", str(data), "--variants", "weightnorm,normal",
                 "--seeds", "0", *_TINY, "--out", str(out)]) == 2
    assert not (out / "fashion-mnist-weightnorm-s0").exists()  # refused before it trained


def test_lr_sweep_refuses_a_folder_with_a_run(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["lr_sweep", "--data-dir", str(data), "--variants", "normal", "--lrs", "0.1",
            "--seeds", "0", "--epochs", "1", "--hidden", "4", "--batch-size", "10",
            "--init-examples", "10", "--threads", "1", "--no-progress", "--train-subset", "20",
            "--test-subset", "10", "--out", str(out)]
    assert main(argv) == 0
    folder = next(out.iterdir())
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(argv) == 2
    assert str(folder) in capsys.readouterr().err
    assert _snapshot(folder) == before
    assert main(argv + ["--overwrite"]) == 0


def test_vae_refuses_a_folder_with_a_run(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["vae", "--quick", "--variants", "normal", "--seeds", "0", "--epochs", "1",
            "--data-dir", str(data), "--train-subset", "20", "--test-subset", "10",
            "--batch-size", "10", "--init-examples", "10", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    folder = out / "vae-normal-s0"
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(argv + ["--lr", "0.1"]) == 2
    assert str(folder) in capsys.readouterr().err
    assert _snapshot(folder) == before
    assert main(argv + ["--batch-size", "0", "--overwrite"]) == 2
    assert _snapshot(folder) == before


def test_classify_gpu_refuses_a_folder_with_a_run(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["classify_gpu", "--data-dir", str(data), "--variants", "normal", "--seeds", "0,1",
            "--width", "0.04", "--batch-size", "10", "--init-examples", "10", "--epochs", "1",
            "--device", "cpu", "--procs", "1", "--eval-batch-size", "10", "--out", str(out)]
    assert main(argv) == 0
    before = {f.name: _snapshot(f) for f in out.iterdir() if f.is_dir() and f.name != "report"}
    assert sorted(before) == ["fashion-mnist-normal-s0", "fashion-mnist-normal-s1"]
    capsys.readouterr()
    assert main(argv + ["--lr", "0.5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {f: _snapshot(out / f) for f in before} == before


def test_demo_runs_twice_in_a_row(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "fashion", tmp_path / "demo"
    write_fashion(data, n_train=20, n_test=10)
    argv = ["demo", "--data-dir", str(data), "--variants", "normal,weightnorm", "--seeds", "0",
            "--procs", "1", "--eval-batch-size", "10", "--train-subset", "20", "--test-subset",
            "10", *_TINY, "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0
    assert "replacing the previous demo runs" in capsys.readouterr().out
    info = json.loads((out / "demo.json").read_text())
    assert info["runs"] == 2 and info["processes"] == 1 and info["cpu_s"] > 0
    assert (out / "report" / "report.md").is_file() and (out / "report" /
                                                         "training_error.png").is_file()
    assert main(argv + ["--no-overwrite"]) == 2
    # a demo with another seed reports its own runs, not the earlier demo's beside them
    assert main([a if a != "0" else "1" for a in argv]) == 0
    assert "2 other run folder(s)" in capsys.readouterr().out
    md = (out / "report" / "report.md").read_text()
    assert "-s1" in md and "fashion-mnist-normal-s0" not in md
    assert "| normal |" in md and "| 1 |" in md.split("| normal |")[1].split("\n")[0]


def test_demo_refuses_a_folder_of_runs_no_demo_wrote(tmp_path: Path, capsys) -> None:
    # the demo's default --overwrite replaced a 15-epoch classify run of the same name with a
    # 1-epoch one, and the report beside it, calling them an earlier demo's
    data, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data, n_train=20, n_test=10)
    common = ["--data-dir", str(data), "--variants", "normal", "--seeds", "0", "--procs", "1",
              "--eval-batch-size", "10", "--device", "cpu", "--out", str(out)]
    assert main(["classify_gpu", *common, "--width", "0.04", "--batch-size", "10",
                 "--init-examples", "10", "--epochs", "1"]) == 0
    before = _snapshot(out / "fashion-mnist-normal-s0")
    capsys.readouterr()
    demo = ["demo", *common, "--train-subset", "20", "--test-subset", "10", *_TINY]
    # the same run names, another seed (whose report would replace classify's), and
    # --no-overwrite (which marked the folder a demo's before refusing, so the next demo
    # replaced the runs)
    for argv in (demo, [a if a != "0" else "1" for a in demo], demo + ["--no-overwrite"]):
        assert main(argv) == 2
        assert "holds run folders that no demo wrote" in capsys.readouterr().err
    assert main(demo) == 2
    assert _snapshot(out / "fashion-mnist-normal-s0") == before
    assert not (out / "demo.json").exists() and not (out / "fashion-mnist-normal-s1").exists()


def test_a_copy_without_git_names_its_commit_from_the_environment(monkeypatch) -> None:
    """On a machine that gets the checkout without .git, the command line passes the commit."""
    from experiments import common

    monkeypatch.setattr(common, "_git", lambda args: None)
    monkeypatch.setenv("EXPERIMENTS_GIT_COMMIT", "0123abc")
    info = common.version_info("cpu")
    assert info["git_commit"] == "0123abc" and info["git_dirty"] is None


@pytest.mark.parametrize("script", ["classify", "lr_sweep", "seq", "graph"])
def test_an_out_that_names_a_file_is_a_one_line_error(tmp_path: Path, capsys,
                                                      script: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    data = tmp_path / "fashion"
    write_fashion(data, n_train=20, n_test=10)
    import importlib

    mod = importlib.import_module(f"experiments.{script}")
    with pytest.raises(SystemExit) as e:
        code = mod.main(["--data-dir", str(data), "--out", str(afile), "--epochs", "1"])
        raise SystemExit(code)
    assert e.value.code == 2 or "is a file" in str(e.value.code)
    assert "afile is a file; expected a folder" in capsys.readouterr().err + str(e.value.code)
    assert afile.read_text() == "not a folder"


# every entry point that writes under --out, with options that would train for a moment
_WRITERS = {
    "classify": ["--variants", "normal", "--seeds", "0", *_TINY],
    "classify_gpu": ["--variants", "normal", "--seeds", "0", "--device", "cpu", "--epochs", "1"],
    "classify_gpu --timing": ["--variants", "normal", "--device", "cpu", "--timing"],
    "demo": ["--variants", "normal", "--seeds", "0", "--device", "cpu", "--epochs", "1"],
    "lr_sweep": ["--variants", "normal", "--lrs", "0.1", "--seeds", "0", "--epochs", "1"],
    "vae": ["--quick", "--variants", "normal", "--seeds", "0", "--device", "cpu"],
    "seq": ["--quick", "--variants", "normal", "--seeds", "0", "--device", "cpu"],
    "dqn": ["--quick", "--variants", "normal", "--seeds", "0", "--device", "cpu"],
    "graph": ["--quick", "--variants", "normal", "--seeds", "0", "--device", "cpu"],
    "graph --report-only": ["--report-only"],
    "norm_growth": ["--epochs", "1"],
}


@pytest.mark.parametrize("where", ["afile/sub", "dangling", "dangling/sub"])
@pytest.mark.parametrize("script", list(_WRITERS))
def test_an_out_inside_a_file_or_through_a_dangling_symlink_is_a_one_line_error(
        tmp_path: Path, capsys, script: str, where: str) -> None:
    """mkdir cannot make either folder: said in one line naming the path, before any work,
    not as a traceback after it (a dangling symlink is neither there nor absent to mkdir)."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    name, *flags = script.split()
    argv = [*flags, *_WRITERS[script], "--out", str(tmp_path / where)]
    if name not in ("dqn", "graph"):
        argv += ["--data-dir", str(tmp_path / "no-data")]  # refused before the data is read
    mod = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as e:
        raise SystemExit(mod.main(argv))
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    bad = tmp_path / where.split("/")[0]
    what = ("is a file" if where.startswith("afile") else
            f"is a symlink to {tmp_path / 'nowhere'}, which does not exist")
    assert e.value.code == 2 or name == "norm_growth"  # norm_growth exits with its message
    assert f"{bad} {what}; expected a folder for" in err and "(--out)" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert not (tmp_path / "nowhere").exists()


def test_ctrl_c_in_an_entry_point_is_one_line_and_exit_status_130(capsys) -> None:
    from experiments.common import entry_point

    def interrupted() -> int:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        entry_point(interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: each run folder keeps")
    with pytest.raises(SystemExit) as e:
        entry_point(lambda: 2)
    assert e.value.code == 2


def test_ctrl_c_in_the_demo_does_not_advise_a_resume_it_lacks(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "import experiments.classify_gpu as g\n"
            "def stop(*a, **k):\n"
            "    raise KeyboardInterrupt\n"
            "g.run_all = stop\n"
            f"sys.argv = ['demo', '--out', {str(tmp_path / 'demo')!r}]\n"
            "runpy.run_module('experiments.demo', run_name='__main__')\n")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.startswith("interrupted: each run folder keeps")
    assert "--resume" not in r.stderr and "run the demo again" in r.stderr
