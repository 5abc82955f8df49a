"""Argument checks shared by the repro commands: bad values are refused before any data is
loaded or any run folder is touched, with a message naming the option and what it expects
(``--batch-size must be >= 1; got 0``); and the guard that keeps a run from overwriting
another's folder."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from wnorm import WnormError

__all__ = ["check_config", "check_device", "refuse_existing", "has_metrics", "flag",
           "no_repeats"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(k: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and v >= k), f"an integer >= {k}"


_POS = (lambda v: _finite(v) and v > 0), "a finite number > 0"
_NONNEG = (lambda v: _finite(v) and v >= 0), "a finite number >= 0"
_UNIT = (lambda v: _finite(v) and 0 <= v < 1), "in [0, 1)"
_UNIT_CLOSED = (lambda v: _finite(v) and 0 <= v <= 1), "in [0, 1]"

#: field name -> (test, what it must be); a field that is None (a "use the default") passes
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": _int_at_least(1),
    "steps": _int_at_least(1),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "init_examples": _int_at_least(1),
    "threads": _int_at_least(1),
    "train_subset": _int_at_least(1),
    "test_subset": _int_at_least(1),
    "hidden": _int_at_least(1),
    "depth": _int_at_least(1),
    "layers": _int_at_least(1),
    "channels": _int_at_least(1),
    "latent": _int_at_least(1),
    "blocks": _int_at_least(0),
    "log_every": _int_at_least(1),
    "vnorm_every": _int_at_least(1),
    "buffer": _int_at_least(1),
    "learning_starts": _int_at_least(0),
    "train_every": _int_at_least(1),
    "target_every": _int_at_least(1),
    "lr": _POS,
    "width": _POS,
    "eps": _POS,
    "init_scale": _POS,
    "noise": _NONNEG,
    "momentum": _UNIT,
    "decay_start": _NONNEG,
    "dropout": _UNIT,
    "beta1": _UNIT,
    "beta1_late": _UNIT,
    "beta2": _UNIT,
    "gamma": _UNIT_CLOSED,
    "eps_start": _UNIT_CLOSED,
    "eps_end": _UNIT_CLOSED,
    "eps_fraction": (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
}


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_config(cfg: Any) -> None:
    """Refuse a dataclass config with a value outside :data:`RULES` (and a bad ``device``).

    Raises:
        WnormError: ``--option must be ...; got value``.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        rule = RULES.get(f.name)
        if rule is None or value is None:
            continue
        ok, what = rule
        if not ok(value):
            raise WnormError(f"{flag(f.name)} must be {what}; got {value!r}")
    if hasattr(cfg, "device"):
        check_device(cfg.device)


def check_device(name: str) -> None:
    """``auto``, ``cpu``, or a CUDA device this machine has."""
    import torch

    if name in ("auto", "cpu"):
        return
    if name != "cuda" and not name.startswith("cuda:"):
        raise WnormError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    index = 0
    if name.startswith("cuda:"):
        try:
            index = int(name[5:])
        except ValueError:
            raise WnormError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if not torch.cuda.is_available():
        raise WnormError(f"--device {name}: CUDA is not available here (torch "
                         f"{torch.__version__}, {'no CUDA build' if torch.version.cuda is None else 'no GPU found'}); "
                         "use --device cpu or auto")
    if not 0 <= index < torch.cuda.device_count():
        raise WnormError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")


def no_repeats(items: list[Any], option: str) -> list[Any]:
    """``items``, refusing a value given twice (it would train or count one run twice)."""
    seen = set()
    for x in items:
        if x in seen:
            raise WnormError(f"{option}: {x!r} is given twice; each value once")
        seen.add(x)
    return items


def has_metrics(folder: Path) -> bool:
    m = folder / "metrics.jsonl"
    return m.is_file() and m.stat().st_size > 0


def refuse_existing(folders: list[Path], overwrite: bool) -> None:
    """Refuse to train into run folders that already hold metrics, unless ``overwrite``.

    Raises:
        WnormError: naming the first such folder (and how many there are).
    """
    if overwrite:
        return
    taken = [f for f in folders if has_metrics(f)]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise WnormError(f"run folder {taken[0]}{more} already holds a run (metrics.jsonl); "
                         "choose another --out, move it away, or pass --overwrite to replace it")
