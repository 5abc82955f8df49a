"""tools/gpu.sh, the device calls of a session with a GPU, run here on a CPU at tiny sizes:
each stage writes its log and a .tgz of its run folders, within the device's file limits."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fakes import write_fashion

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--width", "0.04", "--batch-size", "10", "--init-examples", "10", "--device", "cpu"]


def _run(stage: str, out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data), "COMMIT": "0" * 40}
    return subprocess.run(["bash", "tools/gpu.sh", stage, str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_classify_and_timing_stages_write_their_logs_and_archives(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fashion", n_train=40, n_test=20)
    out = tmp_path / "out"
    done = _run("classify", out, tmp_path / "fashion", "--variants", "normal,weightnorm",
                "--seeds", "0", "--stack", "1", "--procs", "1", "--epochs", "1",
                "--eval-batch-size", "20", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(out / "classify-gpu.tgz") as tar:
        names = tar.getnames()
    assert "classify-gpu/harness.json" in names
    assert "classify-gpu/fashion-mnist-weightnorm-s0/metrics.jsonl" in names
    done = _run("timing", out, tmp_path / "fashion", "--variants", "normal,batchnorm",
                "--timing-steps", "1", "--timing-rounds", "2", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(out / "classify-gpu-timing.tgz") as tar:
        assert "classify-gpu-timing/timing.md" in tar.getnames()
    assert len(list(out.iterdir())) <= 8  # the device brings back at most 8 files


def test_an_unknown_stage_is_an_error(tmp_path: Path) -> None:
    done = _run("everything", tmp_path / "out", tmp_path)
    assert done.returncode == 2 and "unknown stage 'everything'" in done.stderr
