"""experiments.classify's schedule: the authors' ``lr * min(2 - epoch / (0.5 * n_epochs), 1)``, so
with an odd number of epochs the last epoch still learns; and the report says what ran, read
from each run's own config (old runs recorded ``decay_start = epochs // 2``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.classify import Config, schedule
from experiments.report import report


@pytest.mark.parametrize("epochs", [1, 3, 15, 16, 200])
def test_default_schedule_is_the_authors_and_never_ends_at_lr_zero(epochs: int) -> None:
    cfg = Config(epochs=epochs, lr=1.0)
    lrs = [schedule(cfg, e)[0] for e in range(epochs)]
    authors = [min(2 - e / (0.5 * epochs), 1.0) for e in range(epochs)]
    assert lrs == pytest.approx(authors)
    assert lrs[-1] > 0  # the last epoch runs at a positive learning rate
    assert Config(epochs=epochs).resolved().decay_start == epochs / 2


def _run(root: Path, epochs: int, decay_start: float, lrs: list[float]) -> None:
    folder = root / "fashion-mnist-normal-s0"
    folder.mkdir(parents=True)
    config = {"dataset": "fashion-mnist", "variant": "normal", "seed": 0, "epochs": epochs,
              "width": 0.125, "train_subset": None, "test_subset": None, "batch_size": 10,
              "lr": 0.001, "beta1": 0.9, "beta1_late": 0.5, "decay_start": decay_start,
              "init_examples": 10, "data": {"source": "fake", "train": 10, "test": 10}}
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": i + 1, "train_error": 0.5, "test_error": 0.5, "seconds": 1.0,
             "lr": lr} for i, lr in enumerate(lrs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_states_the_schedule_that_ran_for_old_integer_decay_start(tmp_path: Path) -> None:
    """An old 15-epoch run (decay_start 7, recorded as an int): full lr for 8 epochs, the last
    at lr 0; the report says so instead of 'constant for 7 epochs'."""
    old = Config(epochs=15, decay_start=7, lr=0.001)
    lrs = [schedule(old, e)[0] for e in range(15)]
    assert lrs[-1] == 0.0 and lrs.count(0.001) == 8
    _run(tmp_path / "runs", 15, 7, lrs)
    md = report([tmp_path / "runs"], tmp_path / "rep")[2]
    assert "constant for 7 epochs" not in md
    assert "lr 0.001 for epochs 1-8" in md and "the last epoch ran at lr 0" in md
    assert "beta1 0.9 for epochs 1-7, then 0.5" in md


def test_report_states_the_new_float_schedule() -> None:
    from experiments.report import schedule_text

    c = {"epochs": 15, "lr": 0.001, "decay_start": 7.5, "beta1": 0.9, "beta1_late": 0.5}
    text = schedule_text(c)
    assert "for epochs 1-8" in text and "h = 7.5" in text and "ran at lr 0" not in text
    assert "beta1 0.9 for epochs 1-8, then 0.5" in text
