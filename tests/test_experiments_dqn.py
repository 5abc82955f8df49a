"""experiments.dqn end to end on CartPole, the replay buffer, and others_report on all three
experiments: it detects each from config.json and answers from the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import wnorm
from wnorm import WnormError
from experiments import dqn
from experiments.common import RunFolder
from experiments.report_others import report, run_command

pytest.importorskip("gymnasium")


def test_replay_is_a_ring_buffer() -> None:
    r = dqn.Replay(3, 2)
    for i in range(5):
        r.add(np.full(2, i, np.float32), i % 2, float(i), np.full(2, i + 1, np.float32), i == 4)
    assert r.n == 3
    assert sorted(r.rew.tolist()) == [2.0, 3.0, 4.0]  # the oldest two were overwritten
    o, a, rew, o2, d = r.sample(np.random.default_rng(0), 50, torch.device("cpu"))
    torch.testing.assert_close(o2, o + 1)
    assert set(rew.tolist()) == {2.0, 3.0, 4.0} and bool((d == (rew == 4.0).float()).all())


def test_q_network_weightnorm() -> None:
    net = wnorm.apply(dqn.q_network(4, 2, hidden=8, layers=2))
    assert [n for n, _ in net.named_parameters() if n.endswith("weight_g")] == [
        "0.weight_g", "2.weight_g", "4.weight_g"]
    rep = wnorm.data_init(net, torch.randn(100, 4))
    assert len(rep.initialized) == 3
    q = net(torch.randn(100, 4))
    assert q.shape == (100, 2)


@pytest.mark.slow
def test_quick_cartpole_runs_and_reports(tmp_path: Path) -> None:
    assert dqn.main(["--quick", "--seeds", "0", "--envs", "CartPole-v1", "--out",
                     str(tmp_path / "runs"), "--device", "cpu", "--no-progress"]) == 0
    for v in ("normal", "weightnorm"):
        f = tmp_path / "runs" / f"dqn-CartPole-v1-{v}-s0"
        config = json.loads((f / "config.json").read_text())
        assert config["experiment"] == "dqn" and config["steps"] == dqn.QUICK["steps"]
        assert config["reward_threshold"] == 475.0
        rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) > 5 and [r["episode"] for r in rows] == list(range(1, len(rows) + 1))
        steps = [r["env_steps"] for r in rows]
        assert steps == sorted(steps) and steps[-1] <= dqn.QUICK["steps"]
        assert all(r["return"] == r["length"] for r in rows)  # CartPole: +1 per step
        assert any(r["loss"] is not None for r in rows)
    log = (tmp_path / "runs" / "dqn-CartPole-v1-weightnorm-s0" / "log.txt").read_text()
    assert "data init on 100 random-policy states: 3 layers initialized" in log

    md = report([tmp_path / "runs"], tmp_path / "rep")
    assert (tmp_path / "rep" / "dqn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### CartPole-v1" in md and "| normal | 1 |" in md and "| weightnorm | 1 |" in md


def _fake(out: Path, cfg: object, name: str, rows: list[dict]) -> None:
    with RunFolder(out / name, cfg, torch.device("cpu"), {"data": {"train": 10, "test": 5}},
                   echo=False) as f:
        for r in rows:
            f.write(r)


def test_report_covers_all_three_experiments_and_answers_from_the_data(tmp_path: Path) -> None:
    from experiments.seq import SeqConfig
    from experiments.vae import VAEConfig

    out = tmp_path / "runs"
    for seed in range(3):
        for v, better in (("normal", 0.0), ("weightnorm", 1.0)):
            steps = [[10 * i, 300.0 - 5 * i - 20 * better] for i in range(1, 5)]
            _fake(out, VAEConfig(variant=v, seed=seed, epochs=2, out=str(out)), f"vae-{v}-s{seed}",
                  [{"epoch": e, "train_neg_elbo": 300 - 10 * e, "test_neg_elbo":
                    290 - 10 * e - 20 * better + seed, "seconds": 1.0, "step_losses": steps}
                   for e in (1, 2)])
            _fake(out, SeqConfig(variant=v, seed=seed, epochs=2, out=str(out)), f"seq-{v}-s{seed}",
                  [{"epoch": e, "test_error": 0.3 - 0.1 * better - 0.05 * e, "seconds": 1.0,
                    "step_losses": [[s, 2.0 - 0.1 * s - better]
                                    for s in range(4 * e - 3, 4 * e + 1)]}
                   for e in (1, 2)])
            cfg = dqn.DQNConfig(variant=v, seed=seed, steps=1000, out=str(out))
            f = RunFolder(out / f"dqn-CartPole-v1-{v}-s{seed}", cfg, torch.device("cpu"),
                          {"reward_threshold": 475.0}, echo=False)
            with f:
                for i in range(1, 21):
                    f.write({"episode": i, "env_steps": 50 * i, "return": 20.0 * i * (1 + better),
                             "length": 10, "seconds": 0.1 * i})
                f.log("done: 20 episodes in 2s")
    # WN without data init is its own row beside the two variants, on the same plot
    with RunFolder(out / "dqn-no-init", dqn.DQNConfig(variant="weightnorm", seed=0, steps=1000,
                                                      data_init=False, out=str(out)),
                   torch.device("cpu"), {"reward_threshold": 475.0}, echo=False) as f:
        for i in range(1, 21):
            f.write({"episode": i, "env_steps": 50 * i, "return": 10.0 * i, "length": 10,
                     "seconds": 0.1 * i})
        f.log("done: 20 episodes in 2s")
    md = report([out], tmp_path / "rep")
    assert "| weightnorm, no data init | 1 |" in md and "incomplete" not in md
    assert md.count("### CartPole-v1") == 1
    for png in ("vae.png", "seq.png", "dqn.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Convolutional VAE" in md and "## LSTM" in md and "## Deep Q-learning" in md
    assert "Final test bound: weightnorm 251.00 vs normal 271.00 nats (difference -20.00 nats; " \
           "better: **weightnorm**; the seed ranges do not overlap)" in md
    assert "Final test error: weightnorm 10.00 vs normal 20.00 %" in md
    assert "Return over the last 20% of steps" in md and "better: **weightnorm**" in md
    # 10-episode averages of 40 i (WN), 20 i (normal), 10 i (no init) end at 620, 310, 155:
    # the common level is 150, reached after episode 7 (WN: mean 40 * 4) and 12 (normal)
    assert "Steps to a 10-episode average of 150: weightnorm 350 steps; normal 600 steps." in md
    assert "| 3 of 3 |" in md and "| 0 of 3 |" in md  # the gym threshold 475: WN only
    # the summary table on the first screen carries the same verdicts
    assert "| VAE, 2 epochs | final test -ELBO (nats, lower better) | 271.00 ± 1.00 " \
           "(270.00 to 272.00) | 251.00 ± 1.00 (250.00 to 252.00) | -20.00 | " \
           "**weightnorm**; the seed ranges do not overlap |" in md
    assert md.index("## Summary") < md.index("## Convolutional VAE")


def test_report_refuses_folders_without_these_experiments(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"variant": "normal"}))
    with pytest.raises(WnormError, match="no run folder of the experiments"):
        report([tmp_path], tmp_path / "rep")


def test_report_names_the_command_that_made_the_runs() -> None:
    """Runs made before the experiments moved out of the package (wnorm.repro, which no
    longer exists) name the command that runs the same code today; new ones the script."""
    assert run_command(["/x/wnorm/repro/dqn.py", "--seeds", "0"]) == \
        "python -m experiments.dqn --seeds 0"
    assert run_command(["/x/wnorm/repro/__main__.py", "vae", "--quick"]) == \
        "python -m experiments.vae --quick"
    assert run_command(["/x/experiments/dqn.py", "--seeds", "0"]) == \
        "python -m experiments.dqn --seeds 0"
    assert run_command([]) is None


def _parser_error(argv: list[str], capsys) -> str:
    """stderr of ``dqn.main(argv)``, which must exit with argparse's status 2."""
    with pytest.raises(SystemExit) as e:
        dqn.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,message", [
    # the data init ran only at step == learning_starts and steps start at 1: skipped, while
    # config.json said data_init true
    (["--variant", "weightnorm", "--learning-starts", "0"], "needs at least 2"),
    (["--variant", "weightnorm", "--learning-starts", "1"], "needs at least 2"),
    # every episode's loss was null: no gradient step, and the run was marked finished
    (["--variant", "normal", "--learning-starts", "600"], "no gradient step would be taken"),
    (["--learning-starts", "700"], "--learning-starts 700 is not below --steps 600"),
])
def test_a_schedule_that_never_trains_or_inits_is_refused_before_anything_is_written(
        tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "out"
    err = _parser_error(["--quick", "--seeds", "0", *extra, "--out", str(out), "--device", "cpu",
                         "--no-progress"], capsys)
    assert message in err
    assert not out.exists()


def test_no_data_init_or_normal_may_start_learning_at_once() -> None:
    for variant, init in (("normal", True), ("weightnorm", False)):
        dqn.check_steps(dqn.DQNConfig(variant=variant, data_init=init, learning_starts=0))


@pytest.mark.parametrize("env,space", [("CliffWalking-v1", "Discrete(48)"),
                                       ("Blackjack-v1", "Tuple(")])
def test_an_observation_space_that_is_not_a_vector_is_refused_before_any_folder(
        tmp_path: Path, capsys, env: str, space: str) -> None:
    """CliffWalking's scalar state crashed at ``q.argmax(1)`` after training began, Blackjack's
    tuple in ``np.prod(shape)``; both after the run folder was made."""
    out = tmp_path / "out"
    err = _parser_error(["--quick", "--seeds", "0", "--envs", f"CartPole-v1,{env}", "--out",
                         str(out), "--device", "cpu", "--no-progress"], capsys)
    assert f"{env} needs a 1-D Box observation space" in err and f"got {space}" in err
    assert not out.exists()  # CartPole, listed first, did not train either
    with pytest.raises(WnormError, match="1-D Box observation space"):
        dqn.train_one(dqn.DQNConfig(env=env, out=str(out), **dqn.QUICK), echo=False)
    assert not out.exists()


def test_report_of_an_environment_without_a_reward_threshold(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    for v in ("normal", "weightnorm"):
        cfg = dqn.DQNConfig(variant=v, env="MountainCar-v0", steps=1000, out=str(out))
        with RunFolder(out / f"dqn-x-{v}-s0", cfg, torch.device("cpu"),
                       {"reward_threshold": None}, echo=False) as f:
            for i in range(1, 21):
                f.write({"episode": i, "env_steps": 50 * i, "return": -200.0 + i, "length": 10,
                         "seconds": 0.1 * i})
            f.log("done: 20 episodes in 2s")
    md = report([out], tmp_path / "rep")  # formatted None with {:g}: TypeError
    assert "| seeds reaching the threshold none |" in md
    assert "the environment's reward threshold is none." in md
    assert md.count("| n/a |") == 2
