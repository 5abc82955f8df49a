"""The benchmark suite runs end to end and writes well-formed results (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_json_is_complete_and_every_ratio_is_finite_positive(quick_run: Path) -> None:
    from bench.cases import VARIANTS, cases

    data = json.loads((quick_run / "bench.json").read_text())
    env = data["environment"]
    for key in ("torch", "torch_threads", "cpu_model", "wnorm_version", "git_commit",
                "loadavg_start", "loadavg_end"):
        assert key in env, key
    assert env["torch_threads"] >= 1
    assert data["config"]["quick"] is True and data["config"]["conv_width"] > 0
    names = [c["name"] for c in data["cases"]]
    assert names == [c.name for c in cases("cpu")]
    for c in data["cases"]:
        assert "plain" in c["ratio"] and c["ratio"]["plain"] == pytest.approx(1.0)
        assert set(c["ratio"]) | set(c["not_applicable"]) <= set(VARIANTS)
        assert "wnorm" in c["ratio"], c["name"]
        for v, r in c["ratio"].items():
            assert isinstance(r, float) and math.isfinite(r) and r > 0, (c["name"], v, r)
            raw = c["raw_s"][v]
            assert len(raw) == data["config"]["repeats"]
            assert all(math.isfinite(t) and t > 0 for t in raw)
            assert c["median_s"][v] == pytest.approx(sorted(raw)[len(raw) // 2])
        for v, t in c["targets"].items():
            assert t > 0 and v in VARIANTS


def test_markdown_has_one_row_per_case_with_every_column(quick_run: Path) -> None:
    data = json.loads((quick_run / "bench.json").read_text())
    md = (quick_run / "bench.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| case |"))
    ncols = header.count("|")
    assert "wnorm" in header and "target" in header and "PASS/MISS" in header
    rows = {line.split("|")[1].strip().split(" ")[0]: line
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    for c in data["cases"]:
        row = rows[c["name"]]
        assert row.count("|") == ncols
        assert ("PASS" in row) or ("MISS" in row) or not c["targets"]


def test_report_rerenders_the_same_markdown(quick_run: Path, tmp_path: Path) -> None:
    from bench import report

    report.main([str(quick_run / "bench.json"), "--out", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == (quick_run / "bench.md").read_text()
