r"""Deep Q-learning on CartPole-v1 and Acrobot-v1, normal vs weight norm (paper, section 6).

DQN (Mnih et al., 2015) with a replay buffer and a target network :math:`\bar\theta` copied
from the online network every ``target_every`` environment steps; every ``train_every`` steps
one Adam step on the Huber loss of

.. math::
    Q_\theta(s, a) - \big(r + \gamma\,(1 - \text{terminated})\,\max_{a'} Q_{\bar\theta}(s', a')\big)

over a batch from the buffer (gradients clipped to norm 10). Acting is
:math:`\epsilon`-greedy, :math:`\epsilon` linear from ``eps_start`` to ``eps_end`` over the
first ``eps_fraction`` of the steps; the first ``learning_starts`` steps act uniformly at
random. The Q-network is an MLP (``layers`` hidden layers of ``hidden`` ReLU units).

Variants: ``normal`` = plain layers, PyTorch's default init (the usual DQN); ``weightnorm`` =
``wnorm.apply`` on the Q-network and, with ``data_init`` (default), ``wnorm.data_init`` on the
first ``init_examples`` states of the random-policy phase (the output layer's Q-values then
start with mean 0, std 1 per action over those states). The target network is a copy.

Run (from the repository root; the committed results)::

    python -m experiments.dqn --envs CartPole-v1,Acrobot-v1 --seeds 0,1,2,3,4 --out results/dqn
    # the ablation: weight norm without the data-dependent init
    python -m experiments.dqn --envs CartPole-v1,Acrobot-v1 --variant weightnorm \
        --no-data-init --seeds 0,1,2,3,4 --out results/dqn-no-init
    # on a GPU: a wider Q-network and more steps (the environment still steps on the CPU, one
    # transition at a time, so it sets the pace)
    python -m experiments.dqn --device cuda --envs CartPole-v1,Acrobot-v1 --seeds 0,1,2,3,4 \
        --hidden 256 --steps 100000 --out runs/dqn-gpu

Each (env, variant, seed) writes ``<out>/dqn-<env>-<variant>-s<seed>/``; ``metrics.jsonl`` has
one line per finished episode: ``episode``, ``env_steps`` (when it ended), ``return``,
``length``, ``epsilon``, ``loss`` (mean TD loss of the updates during the episode, or null),
``seconds`` (since the start of the run).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import wnorm
from wnorm import WnormError

from .common import (RunFolder, prepare, progress, run_configs, run_main, run_parser,
                     split_list)

if TYPE_CHECKING:
    import gymnasium

__all__ = ["DQNConfig", "Replay", "q_network", "make_env", "check_steps", "parser", "train_one",
           "main"]


# --------------------------------------------------------------------------- defaults
# as in vae.py and seq.py, on purpose: the script's defaults (fields, VARIANTS, QUICK) in one block
@dataclass
class DQNConfig:
    """One DQN run; the defaults are the committed CPU-sized run."""

    experiment: str = "dqn"
    variant: str = "weightnorm"  # normal | weightnorm
    seed: int = 0
    env: str = "CartPole-v1"
    steps: int = 30000
    hidden: int = 64
    layers: int = 2
    lr: float = 0.001
    gamma: float = 0.99
    batch_size: int = 64
    buffer: int = 50000
    learning_starts: int = 1000
    train_every: int = 2  # env steps per gradient step
    target_every: int = 500  # env steps per target-network copy
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.2
    data_init: bool = True  # weightnorm: data init on the random-policy states
    init_examples: int = 500
    out: str = "runs/dqn"
    threads: int | None = 1
    device: str = "auto"


VARIANTS = ("normal", "weightnorm")
#: --quick: tiny sizes that run in seconds (the tests)
QUICK = {"steps": 600, "hidden": 16, "learning_starts": 200, "init_examples": 100,
         "batch_size": 32, "target_every": 100}


# --------------------------------------------------------------------------- model
def q_network(obs_dim: int, actions: int, hidden: int, layers: int) -> nn.Sequential:
    """MLP ``obs_dim -> [hidden, ReLU] x layers -> actions``."""
    mods: list[nn.Module] = []
    d = obs_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, actions))
    return nn.Sequential(*mods)


class Replay:
    """A ring buffer of transitions (numpy arrays)."""

    def __init__(self, size: int, obs_dim: int) -> None:
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next = np.zeros((size, obs_dim), np.float32)
        self.act = np.zeros(size, np.int64)
        self.rew = np.zeros(size, np.float32)
        self.done = np.zeros(size, np.float32)
        self.size, self.n, self.i = size, 0, 0

    def add(self, o: np.ndarray, a: int, r: float, o2: np.ndarray, terminated: bool) -> None:
        self.obs[self.i], self.act[self.i], self.rew[self.i] = o, a, r
        self.next[self.i], self.done[self.i] = o2, float(terminated)
        self.i = (self.i + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def sample(self, rng: np.random.Generator, k: int, device: torch.device
               ) -> tuple[torch.Tensor, ...]:
        j = rng.integers(0, self.n, k)
        return tuple(torch.from_numpy(a[j]).to(device)
                     for a in (self.obs, self.act, self.rew, self.next, self.done))


# --------------------------------------------------------------------------- training
def run_name(cfg: DQNConfig) -> str:
    return f"dqn-{cfg.env}-{cfg.variant}-s{cfg.seed}"


def make_env(env_id: str) -> gymnasium.Env:
    """``gymnasium.make(env_id)``, checked: the Q-network reads a vector and picks one of
    finitely many actions.

    Raises:
        WnormError: gymnasium cannot make it, or its action space is not Discrete or its
            observation space not a 1-D Box (CliffWalking's Discrete states, Blackjack's Tuple).
    """
    import gymnasium as gym

    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise WnormError(f"dqn: gymnasium cannot make {env_id!r} ({e})") from e
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise WnormError(f"dqn: {env_id} needs a discrete action space; got {env.action_space}")
    space = env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        env.close()
        raise WnormError(f"dqn: {env_id} needs a 1-D Box observation space (the Q-network is an "
                         f"MLP on a vector of numbers, as CartPole's); got {space}")
    return env


def check_steps(cfg: DQNConfig) -> None:
    """Refuse a schedule that never trains or never runs its data init.

    Raises:
        WnormError: ``learning_starts >= steps`` (no gradient step would be taken), or
            ``learning_starts < 2`` with weight norm's data init (it runs once, on the
            random-policy states of the first ``learning_starts`` steps, and needs two).
    """
    if cfg.learning_starts >= cfg.steps:
        raise WnormError(f"--learning-starts {cfg.learning_starts} is not below --steps "
                         f"{cfg.steps}: no gradient step would be taken; give fewer "
                         f"--learning-starts or more --steps")
    if cfg.variant == "weightnorm" and cfg.data_init and cfg.learning_starts < 2:
        raise WnormError(f"--learning-starts {cfg.learning_starts}: weightnorm's data init runs "
                         f"on the random-policy states of the first --learning-starts steps and "
                         f"needs at least 2; give --learning-starts 2 or more, or --no-data-init")


def train_one(cfg: DQNConfig, echo: bool = True, *, overwrite: bool = False,
              progress_bar: bool = False) -> RunFolder:
    """Train ``cfg.variant`` on ``cfg.env`` with ``cfg.seed``; writes and returns the run folder.

    Raises:
        WnormError: a bad setting (:func:`check_steps`) or environment (:func:`make_env`), or
            the folder already holds a run and ``overwrite`` is False (before the folder is
            touched).
    """
    import gymnasium as gym

    if cfg.variant not in ("normal", "weightnorm"):
        raise WnormError(f"dqn: unknown variant {cfg.variant!r}; expected 'normal' or 'weightnorm'")
    check_steps(cfg)
    device = prepare(cfg)
    env = make_env(cfg.env)
    obs_dim = int(env.observation_space.shape[0])
    n_act = int(env.action_space.n)
    name = run_name(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    online = q_network(obs_dim, n_act, cfg.hidden, cfg.layers)
    if cfg.variant == "weightnorm":
        wnorm.apply(online)
    online.to(device)
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=cfg.lr)
    replay = Replay(min(cfg.buffer, cfg.steps), obs_dim)
    thr = env.spec.reward_threshold if env.spec is not None else None
    extra = {"reward_threshold": thr, "obs_dim": obs_dim, "actions": n_act,
             "gymnasium": gym.__version__}
    folder = RunFolder(Path(cfg.out) / name, cfg, device, extra, echo=echo, overwrite=overwrite)
    with folder, progress(cfg.steps, name, progress_bar) as bar:
        log = folder.log
        log(f"{name}: {cfg.steps} env steps, Q-network {obs_dim}-"
            f"{'-'.join([str(cfg.hidden)] * cfg.layers)}-{n_act} "
            f"({sum(p.numel() for p in online.parameters()):,} parameters), device {device}")
        obs, _ = env.reset(seed=cfg.seed)
        env.action_space.seed(cfg.seed)
        ep_return, ep_len, episode = 0.0, 0, 0
        losses: list[float] = []
        t0 = time.perf_counter()
        decay = max(1, int(cfg.eps_fraction * cfg.steps))
        eps = cfg.eps_start
        for step in range(1, cfg.steps + 1):
            if bar is not None and step % 100 == 0:
                bar.update(100)
            eps = cfg.eps_start + (cfg.eps_end - cfg.eps_start) * min(1.0, (step - 1) / decay)
            if step <= cfg.learning_starts or rng.random() < eps:
                action = int(rng.integers(n_act))
            else:
                with torch.no_grad():
                    q = online(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
                action = int(q.argmax(1))
            obs2, reward, terminated, truncated, _ = env.step(action)
            replay.add(obs, action, float(reward), obs2, bool(terminated))
            ep_return += float(reward)
            ep_len += 1
            obs = obs2
            if terminated or truncated:
                episode += 1
                folder.write({"episode": episode, "env_steps": step, "return": ep_return,
                              "length": ep_len, "epsilon": eps,
                              "loss": float(np.mean(losses)) if losses else None,
                              "seconds": time.perf_counter() - t0})
                if episode % 20 == 0:
                    log(f"step {step}/{cfg.steps}  episode {episode}  return {ep_return:g}  "
                        f"eps {eps:.3f}  {time.perf_counter() - t0:.0f}s")
                obs, _ = env.reset()
                ep_return, ep_len, losses = 0.0, 0, []
            if step == cfg.learning_starts and cfg.variant == "weightnorm" and cfg.data_init:
                states = torch.from_numpy(replay.obs[:min(replay.n, cfg.init_examples)].copy())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rep = wnorm.data_init(online, states.to(device))
                target.load_state_dict(online.state_dict())
                log(f"data init on {states.shape[0]} random-policy states: "
                    f"{len(rep.initialized)} layers initialized, {len(rep.skipped)} skipped")
            if step > cfg.learning_starts and step % cfg.train_every == 0:
                o, a, r, o2, d = replay.sample(rng, cfg.batch_size, device)
                with torch.no_grad():
                    y = r + cfg.gamma * (1.0 - d) * target(o2).max(1).values
                qa = online(o).gather(1, a[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(qa, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(online.parameters(), 10.0)
                opt.step()
                losses.append(float(loss.detach()))
            if step % cfg.target_every == 0:
                target.load_state_dict(online.state_dict())
        log(f"done: {episode} episodes in {time.perf_counter() - t0:.0f}s")
    env.close()
    return folder


# --------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = run_parser("dqn", __doc__, DQNConfig, variants=VARIANTS, seeds="0,1,2,3,4")
    p.add_argument("--envs", default=None,
                   help="comma-separated gymnasium ids (overrides --env), "
                        "e.g. CartPole-v1,Acrobot-v1")
    return p


def configs_from(args: argparse.Namespace) -> list[DQNConfig]:
    """One checked config per (env, variant, seed), one environment after the other.

    Raises:
        WnormError: a bad option or environment, named (for ``parser.error``).
    """
    envs = (split_list(args.envs, str, "--envs") if args.envs is not None
            else [args.env or DQNConfig.env])
    configs = run_configs(DQNConfig, args, QUICK, VARIANTS,
                          lambda v, s: [{"variant": v, "seed": s, "env": e} for e in envs])
    configs.sort(key=lambda c: envs.index(c.env))
    c = configs[0]
    if min(c.buffer, c.steps) < c.batch_size:  # else training samples one transition per batch
        raise WnormError(f"--buffer {c.buffer} holds fewer transitions than a batch (--batch-size "
                         f"{c.batch_size}); give a buffer of at least the batch size")
    for cfg in configs:
        check_steps(cfg)
    for env in envs:  # an environment the Q-network cannot read, before any run trains
        make_env(env).close()
    return configs


def main(argv: list[str] | None = None) -> int:
    """Train every (env, variant, seed) asked for; returns the exit status."""
    return run_main(parser(), argv, configs_from, run_name, lambda cfg: (), train_one)


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
