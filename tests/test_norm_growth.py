"""experiments/norm_growth.py at a tiny size: the run folder, the mechanism in its numbers (plain
weight norm's ||v|| never shrinks under SGD and grows; projected, it stays at its start), the
report generated from metrics.jsonl, and its option errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("norm_growth", ROOT / "experiments" /
                                                  "norm_growth.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["norm_growth"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _write_idx(d: Path, n_train: int = 60, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, a in ((f"{prefix}-images-idx3-ubyte", images),
                        (f"{prefix}-labels-idx1-ubyte", labels)):
            head = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
            (d / (stem + ".gz")).write_bytes(gzip.compress(head + a.tobytes()))


ARGS = ["--train-subset", "60", "--test-subset", "20", "--width", "8", "--depth", "1",
        "--epochs", "2", "--batch-size", "20", "--init-examples", "20", "--log-every", "1",
        "--lrs", "0.3,3", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("norm_growth")
    _write_idx(tmp / "data")
    return _load().main(ARGS + ["--data-dir", str(tmp / "data"), "--out", str(tmp / "out")])


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_has_config_log_metrics_plot_and_summary(run: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "norm-growth" and cfg["lrs"] == [0.3, 3.0]
    assert cfg["config"]["width"] == 8 and cfg["data"]["train"] == 60
    assert set(cfg["version"]) >= {"git_commit", "git_dirty", "wnorm", "torch", "argv"}
    assert "weightnorm lr 0.3 epoch 2" in (run / "log.txt").read_text()
    assert (run / "norm_growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run / "summary.md").read_text()
    for variant in ("weightnorm", "projected"):
        assert f"| {variant} | 0.3 |" in summary and f"| {variant} | 3 |" in summary


def test_weightnorm_v_never_shrinks_and_grows_while_projected_v_stays_put(run: Path) -> None:
    rows = _lines(run)
    for lr in (0.3, 3.0):
        for variant in ("weightnorm", "projected"):
            start = next(r for r in rows if r["type"] == "start" and r["variant"] == variant
                         and r["lr"] == lr)
            steps = [r for r in rows if r["type"] == "step" and r["variant"] == variant
                     and r["lr"] == lr]
            assert len(steps) == 6  # 3 steps per epoch, every one logged
            for layer, s0 in start["layers"].items():
                norms = [s0["v_norm"]] + [r["layers"][layer]["v_norm"] for r in steps]
                if variant == "projected":
                    assert max(abs(n / s0["v_norm"] - 1) for n in norms) < 1e-5
                else:  # each SGD step on v is orthogonal to v: ||v|| never shrinks
                    assert all(b >= a * (1 - 1e-6) for a, b in zip(norms, norms[1:]))
                    assert norms[-1] > norms[0] * (1 + 1e-4)
    assert any(r["type"] == "epoch" and not r["diverged"] for r in rows)


def test_report_only_redraws_and_a_second_run_needs_overwrite(run: Path) -> None:
    ng = _load()
    (run / "summary.md").unlink()
    ng.main(["--report-only", "--out", str(run)])
    assert (run / "summary.md").exists()
    with pytest.raises(SystemExit, match="already holds a run; pass --overwrite"):
        ng.main(ARGS + ["--out", str(run)])


@pytest.mark.parametrize("bad, says", [
    (["--lrs", "0.1,x"], "--lrs takes comma-separated numbers"),
    (["--lrs", "0.1,0.1"], "--lrs takes distinct finite numbers > 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1; got 0"),
    (["--batch-size", "200", "--train-subset", "100"], "--batch-size 200 is larger than"),
])
def test_bad_options_are_argparse_errors(bad, says, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _load().main(bad + ["--out", "unused"])
    assert e.value.code == 2 and says in capsys.readouterr().err
