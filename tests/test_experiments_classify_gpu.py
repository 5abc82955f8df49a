"""experiments.classify_gpu on the CPU at tiny sizes: the harness runs the same experiment as
experiments.classify, its stacked seeds train like separate runs, its steps never wait for the
device, a diverging seed leaves the others alone, and the command line writes run folders,
harness.json and the report (and, with --timing, the timing table); its plan is the one in its
docstring."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import experiments.classify_gpu as harness
from experiments.classify import Config
from experiments.classify import run as classify_run
from experiments.classify_gpu import PLAN, GPUConfig
from experiments.common import read_jsonl
from experiments.data import ImageData, load
from experiments.gpu_plan import plan, plan_text
from experiments.gpu_timing import time_variants, timing_text
from experiments.stack_trainer import StackTrainer, resolved
from fakes import write_fashion

CPU = torch.device("cpu")
TINY = dict(width=0.04, batch_size=10, init_examples=10, epochs=2, device="cpu",
            eval_batch_size=20, noise=0.0, dropout=0.0, threads=1)


def _data(tmp_path: Path, n_train: int = 40, n_test: int = 20) -> ImageData:
    write_fashion(tmp_path / "fashion", n_train=n_train, n_test=n_test)
    return load("fashion-mnist", tmp_path / "fashion", download=False)


def _cfgs(variant: str, seeds: list[int], **kw: object) -> list[GPUConfig]:
    return [resolved(GPUConfig(variant=variant, seed=s, **(TINY | kw))) for s in seeds]


def _epochs(t: StackTrainer, n: int) -> list[dict]:
    return [t.epoch(e) for e in range(n)]


def test_the_harness_runs_the_same_experiment_as_classify(tmp_path: Path) -> None:
    """Same network, init, data order, optimizer and schedule: one seed through the harness
    and through experiments.classify give the same numbers every epoch."""
    data = _data(tmp_path)
    got = _epochs(StackTrainer(_cfgs("wn+meanonly", [3]), data, CPU), 2)
    cfg = Config(variant="wn+meanonly", seed=3, out=str(tmp_path / "runs"), progress=False,
                 **{k: v for k, v in TINY.items()})
    folder = classify_run(cfg, data)
    want = read_jsonl(folder / "metrics.jsonl")
    for g, w in zip(got, want):
        for key in ("train_loss", "test_loss"):
            assert math.isclose(g[key][0], w[key], rel_tol=1e-4), (key, g[key][0], w[key])
        for key in ("train_error", "test_error"):
            assert g[key][0] == pytest.approx(w[key])
        assert (g["lr"], g["beta1"]) == (w["lr"], w["beta1"])


def test_stacked_seeds_train_like_separate_runs(tmp_path: Path) -> None:
    data = _data(tmp_path)
    both = _epochs(StackTrainer(_cfgs("batchnorm", [0, 1]), data, CPU), 2)
    for i, seed in enumerate((0, 1)):
        alone = _epochs(StackTrainer(_cfgs("batchnorm", [seed]), data, CPU), 2)
        for b, a in zip(both, alone):
            assert b["train_loss"][i] == pytest.approx(a["train_loss"][0], rel=1e-3)
            assert b["test_loss"][i] == pytest.approx(a["test_loss"][0], rel=1e-3)


class _Syncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device."""

    WAITS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func._schema.name in self.WAITS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["weightnorm", "wn+meanonly", "batchnorm"])
def test_training_steps_never_wait_for_the_device(tmp_path: Path, variant: str) -> None:
    t = StackTrainer(_cfgs(variant, [0, 1], bf16=True, channels_last=True), _data(tmp_path),
                     CPU)
    sums = torch.zeros(2, 2, dtype=torch.float64)
    idx = torch.arange(20).reshape(2, 10)
    t.step(idx, sums)  # the first step: lazy state (Adam's moments) made outside the count
    with _Syncs() as mode:
        for _ in range(3):
            t.step(idx, sums)
    assert mode.seen == []


def test_a_diverging_seed_leaves_the_others_alone(tmp_path: Path) -> None:
    data = _data(tmp_path)
    ref = StackTrainer(_cfgs("weightnorm", [0, 1]), data, CPU)
    hit = StackTrainer(_cfgs("weightnorm", [0, 1]), data, CPU)
    ref.epoch(0), hit.epoch(0)
    with torch.no_grad():  # seed 1's share of a layer turns NaN
        hit.model[1].weight_v.chunk(2)[1].fill_(float("nan"))
    r, h = ref.epoch(1), hit.epoch(1)
    assert h["diverged"] == [1] and not math.isfinite(h["train_loss"][1])
    assert h["train_loss"][0] == r["train_loss"][0] and h["test_loss"][0] == r["test_loss"][0]
    assert all(bool(torch.isfinite(p).all()) for p in hit.model.parameters())  # reset
    assert hit.alive == [True, False]


def test_the_command_writes_run_folders_harness_json_and_the_report(tmp_path: Path,
                                                                     capsys) -> None:
    write_fashion(tmp_path / "fashion", n_train=40, n_test=20)
    out = tmp_path / "runs"
    argv = ["--data-dir", str(tmp_path / "fashion"), "--variants", "normal,wn+meanonly",
            "--seeds", "0,1", "--stack", "2", "--procs", "1", "--bf16", "--channels-last",
            "--width", "0.04", "--batch-size", "10", "--init-examples", "10", "--epochs", "2",
            "--device", "cpu", "--eval-batch-size", "20", "--out", str(out)]
    assert harness.main(argv) == 0
    for v in ("normal", "wn+meanonly"):
        for s in (0, 1):
            f = out / f"fashion-mnist-{v}-s{s}"
            config = json.loads((f / "config.json").read_text())
            assert config["precision"] == {"params": "float32", "autocast": "bfloat16",
                                           "tf32_matmul": None, "tf32_cudnn": None,
                                           "channels_last": True, "compile": "off"}
            assert config["stacked_seeds"] == [0, 1] and config["stack"] == 2
            rows = read_jsonl(f / "metrics.jsonl")
            assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["beta1"] == 0.5
            assert all(0 <= r["test_error"] <= 1 and r["train_loss"] > 0 for r in rows)
            assert "epoch 2/2" in (f / "log.txt").read_text()
    h = json.loads((out / "harness.json").read_text())
    assert h["plan"]["steps_per_epoch"] == 4 and set(h["measured"]) == {"normal", "wn+meanonly"}
    normal = h["measured"]["normal"]
    assert normal["planned_step_ms_alone"] == h["plan"]["variants"]["normal"]["step_ms"]
    assert normal["planned_epoch_s_shared"] is None  # one process: nothing shared
    md = (out / "report" / "report.md").read_text()
    assert "| normal | " in md and "| wn+meanonly | " in md and "bfloat16 autocast" in md
    assert "normal s0,1 epoch 2/2" in capsys.readouterr().out
    # a second invocation into the same --out keeps the first one's record
    first = (out / "harness.json").read_text()
    assert harness.main([a if a != "normal,wn+meanonly" else "weightnorm" for a in argv]) == 0
    assert (out / "harness-1.json").read_text() == first
    assert set(json.loads((out / "harness.json").read_text())["measured"]) == {"weightnorm"}


def test_timing_mode_writes_the_table(tmp_path: Path) -> None:
    data = _data(tmp_path)
    t = time_variants(GPUConfig(**TINY), ["normal", "weightnorm", "batchnorm"], data,
                              modes=["off"], steps=2, rounds=3, log=lambda *a: None)
    rows = t["rows"]
    assert rows["normal | off"]["vs_normal"] == {"median": 1.0, "q25": 1.0, "q75": 1.0}
    assert len(rows["batchnorm | off"]["raw_step_s"]) == 3
    assert rows["weightnorm | off"]["epoch_s"] == pytest.approx(
        4 * rows["weightnorm | off"]["step_s"])
    text = timing_text(t, "a CPU", "python -m experiments.classify_gpu --timing")
    assert "| variant | eager s/epoch | eager vs normal |" in text
    assert "- eager: batchnorm " in text and "the paper, on its 2016 GPU" in text


def test_the_docstring_plan_is_what_plan_computes() -> None:
    doc = harness.__doc__
    block = doc[doc.index(".. plan-begin") + len(".. plan-begin"):doc.index(".. plan-end")]
    assert block.strip() == plan_text(plan(GPUConfig(), harness.VARIANTS, PLAN)).strip()


@pytest.mark.slow
def test_worker_processes(tmp_path: Path) -> None:
    """Two worker processes at once, the path of the demo and of the GPU run."""
    write_fashion(tmp_path / "fashion", n_train=40, n_test=20)
    out = tmp_path / "runs"
    assert harness.main(["--data-dir", str(tmp_path / "fashion"), "--variants",
                         "normal,weightnorm", "--seeds", "0", "--stack", "1", "--procs", "2",
                         "--width", "0.04", "--batch-size", "10", "--init-examples", "10",
                         "--epochs", "1", "--device", "cpu", "--eval-batch-size", "20",
                         "--out", str(out)]) == 0
    for v in ("normal", "weightnorm"):
        assert len(read_jsonl(out / f"fashion-mnist-{v}-s0" / "metrics.jsonl")) == 1
    logs = sorted(p.name for p in out.glob("worker-*.log"))  # stderr, kept when not empty
    assert all((out / name).stat().st_size > 0 for name in logs)


@pytest.mark.slow
def test_compiled_steps(tmp_path: Path) -> None:
    """torch.compile of a weight-normalized training step (on the CPU: Inductor's C++), timed
    beside the eager one; it trains, so its timing row is a real one, not a fallback."""
    t = time_variants(dataclasses.replace(GPUConfig(**TINY), compile="default"),
                              ["weightnorm"], _data(tmp_path), modes=["off", "default"],
                              steps=2, rounds=1, log=lambda *a: None)
    row = t["rows"]["weightnorm | default"]
    assert row["compile"] == "default" and row["vs_eager"]["median"] > 0


def test_the_timing_command_writes_timing_json_and_md(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fashion", n_train=40, n_test=20)
    out = tmp_path / "timing"
    assert harness.main(["--timing", "--data-dir", str(tmp_path / "fashion"), "--variants",
                         "normal,batchnorm", "--width", "0.04", "--batch-size", "10",
                         "--init-examples", "10", "--device", "cpu", "--timing-steps", "1",
                         "--timing-rounds", "2", "--out", str(out)]) == 0
    t = json.loads((out / "timing.json").read_text())
    assert t["modes"] == ["off"] and t["rounds"] == 2 and t["steps_per_epoch"] == 4
    assert t["command"].startswith("python -m experiments.classify_gpu --timing")
    md = (out / "timing.md").read_text()
    assert "| batchnorm | " in md and "Generated by `python -m experiments.classify_gpu" in md
    assert not list(out.glob("fashion-mnist-*"))  # timing trains no run folders


@pytest.mark.parametrize("variant", ["weightnorm", "batchnorm"])
def test_a_seed_trains_alike_in_any_stack_and_as_classify_with_noise_and_dropout(
        tmp_path: Path, variant: str) -> None:
    """Each seed's noise and dropout come from its own generator: seed 1 in a stack of three,
    in a stack of two, alone, and through experiments.classify gives the same numbers."""
    data = _data(tmp_path)
    noisy = {"noise": 0.15, "dropout": 0.5}
    three = _epochs(StackTrainer(_cfgs(variant, [0, 1, 2], **noisy), data, CPU), 2)
    two = _epochs(StackTrainer(_cfgs(variant, [2, 1], **noisy), data, CPU), 2)
    alone = _epochs(StackTrainer(_cfgs(variant, [1], **noisy), data, CPU), 2)
    cfg = Config(variant=variant, seed=1, out=str(tmp_path / "runs"), progress=False,
                 **(TINY | noisy))
    want = read_jsonl(classify_run(cfg, data) / "metrics.jsonl")
    for a, b, c, w in zip(three, two, alone, want):
        for key in ("train_loss", "test_loss"):
            for got in (a[key][1], b[key][1], c[key][0]):
                assert math.isclose(got, w[key], rel_tol=1e-5), (key, got, w[key])
        for key in ("train_error", "test_error"):
            assert a[key][1] == b[key][1] == c[key][0] == pytest.approx(w[key])


def test_the_plan_counts_the_subsets_the_processes_and_every_stack(capsys) -> None:
    assert harness.main(["--plan", "--procs", "1", "--stack", "1", "--train-subset", "2000",
                         "--test-subset", "500", "--epochs", "6"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "20 steps per epoch (2000 images)" in text and "1 processes at once" in text
    assert "3 stacks per variant (3 seeds), 15 in all" in text
    one = plan(GPUConfig(stack=1, procs=1), ("normal",), PLAN, seeds=3)
    three = plan(GPUConfig(stack=3, procs=1), ("normal",), PLAN, seeds=3)
    assert one["stacks"] == 3 and one["steps_per_process"] == 3 * 30 * 600
    # three stacks of one seed: the GPU does every seed's work, and launches three times over
    assert one["gpu_s"] > three["gpu_s"]
    small = plan(GPUConfig(), ("normal",), PLAN, train=2000, test=500, seeds=3)
    assert small["steps_per_epoch"] == 20 and small["test"] == 500 and small["processes"] == 1


def test_worker_processes_without_the_data_say_why_once(tmp_path: Path, capsys) -> None:
    """The data is read once before the workers start: its own error, no worker logs."""
    out = tmp_path / "runs"
    assert harness.main(["--data-dir", str(tmp_path / "none"), "--no-download", "--variants",
                         "normal,weightnorm", "--seeds", "0", "--procs", "2", "--device", "cpu",
                         "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fashion-mnist") and "exited with" not in err
    assert not list(out.glob("worker-*.log")) and not list(out.glob("fashion-mnist-*"))


def test_a_failed_worker_names_its_last_log_line(tmp_path: Path) -> None:
    log = tmp_path / "worker-0.log"
    log.write_text("Traceback (most recent call last):\n  ...\nerror: out of memory\n\n")
    assert harness._last_line(log) == "out of memory"
    assert harness._last_line(tmp_path / "missing.log") == ""


def test_a_compiled_noisy_step_is_one_graph_and_draws_what_the_eager_one_draws(
        tmp_path: Path) -> None:
    """With noise and dropout on, the first step records each layer's input eagerly (leaving
    no trace) and draws ahead, so the compiled loss is one graph from the first step on (it
    kept a break at every noise and dropout layer: the first compiled step recorded); the
    seeds draw and train as the eager trainer's."""
    from torch._dynamo.utils import counters

    data = _data(tmp_path)
    noisy = {"noise": 0.15, "dropout": 0.5}
    eager = StackTrainer(_cfgs("weightnorm", [0, 1], **noisy), data, CPU)
    comp = StackTrainer(_cfgs("weightnorm", [0, 1], **noisy), data, CPU)
    comp.compile = "default"  # first_step's compiled path, with Dynamo's eager backend (fast)
    comp._loss_fn = torch.compile(comp._losses, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        got, want = comp.epoch(0), eager.epoch(0)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert [g.get_state().tolist() for g in comp.streams] == \
        [g.get_state().tolist() for g in eager.streams]
    for key in ("train_loss", "test_loss"):
        for a, b in zip(got[key], want[key]):
            assert math.isclose(a, b, rel_tol=1e-5), (key, a, b)
