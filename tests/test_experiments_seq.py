"""experiments.seq: the LSTM's weights are normalized and not data-initialized (reported as
skipped), both variants start as the same function, and the command trains end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import wnorm
from experiments import seq
from experiments.report_others import report

from fakes import write_fashion


def test_weightnorm_normalizes_every_lstm_weight_and_starts_as_normal() -> None:
    x = torch.randn(64, 1, 28, 28)
    out, reports = {}, {}
    for variant in ("normal", "weightnorm"):
        torch.manual_seed(0)
        model = seq.build(variant, hidden=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[variant] = wnorm.data_init(model, x, include_plain=variant == "normal")
        with torch.no_grad():
            out[variant] = model(x)
    model = seq.build("weightnorm", hidden=6)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert wnorm.is_weight_normalized(model.lstm, name)
    status = {r.name: r.status for r in reports["weightnorm"]}
    assert status == {"head": "initialized", "lstm": "skipped"}
    assert [r.name for r in reports["normal"]] == ["head"]  # a plain LSTM is not a candidate
    torch.testing.assert_close(out["normal"], out["weightnorm"], rtol=1e-4, atol=1e-5)
    # the head's logits are standardized on the init batch
    torch.testing.assert_close(out["weightnorm"].std(0, unbiased=False), torch.ones(10),
                               atol=1e-3, rtol=0)


def test_rows_are_the_time_steps() -> None:
    torch.manual_seed(0)
    model = seq.RowLSTM(hidden=4)
    x = torch.randn(2, 1, 28, 28)
    _, (h, _) = model.lstm(x[:, 0])
    torch.testing.assert_close(model(x), model.head(h[-1]))


@pytest.mark.slow
def test_quick_run_writes_run_folders_and_report(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=100, n_test=30)
    assert seq.main(["--quick", "--variants", "normal,weightnorm", "--seeds", "3",
                     "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
                     "--train-subset", "100", "--test-subset", "30", "--no-progress",
                     "--init-examples", "500"]) == 0
    folders = sorted(out.iterdir())
    assert [f.name for f in folders] == ["seq-normal-s3", "seq-weightnorm-s3"]
    for f in folders:
        config = json.loads((f / "config.json").read_text())
        assert config["experiment"] == "seq" and config["seed"] == 3
        assert config["hidden"] == seq.QUICK["hidden"] and config["data"]["train"] == 100
        assert config["init_examples"] == 100  # 500 asked of 100: what ran is recorded
        rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        assert [s for r in rows for s, _ in r["step_losses"]] == [1, 2, 3, 4]
        for r in rows:
            assert 0 <= r["test_error"] <= 1 and r["train_loss"] > 0
        log = (f / "log.txt").read_text()
        assert "epoch 2/2" in log
    wn = json.loads((out / "seq-weightnorm-s3" / "config.json").read_text())
    assert "lstm skipped" in wn["init_summary"] and "head initialized" in wn["init_summary"]
    assert "recurrent layer" in (out / "seq-weightnorm-s3" / "log.txt").read_text()

    md = report([out], tmp_path / "rep")
    assert (tmp_path / "rep" / "seq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| normal | 1 |" in md and "| weightnorm | 1 |" in md
    assert "**Answer.** Final test error: weightnorm" in md
