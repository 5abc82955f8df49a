"""Run folders and options, shared by every experiment script.

A run writes one folder, ``<out>/<name>/``, and reports read nothing else:

- ``config.json``   the resolved options, plus what the run actually used (data, device,
  precision)
- ``version.json``  git commit (and whether the tree was dirty), wnorm, torch, numpy, python,
  platform, hardware, the command line
- ``metrics.jsonl`` one JSON line per epoch (per episode for DQN); a run that diverged ends
  with a line that says ``"diverged": true``
- ``log.txt``       what was printed
- ``done.json``     written when training returned (to its last epoch, or stopped as diverged):
  ``--resume`` keeps such a folder and trains the others again from their start

Options: each script keeps its defaults in one dataclass at its top; :func:`add_options` turns
every field into ``--field-name`` and :func:`check_config` refuses a value outside
:data:`RULES` with a message that names the option (``--batch-size must be an integer >= 1;
got 0``), which the scripts hand to ``parser.error`` (exit status 2, before any data is loaded
or any folder touched).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

import wnorm
from wnorm import WnormError

__all__ = ["DONE", "RULES", "RunFolder", "RunLog", "RunRecord", "add_options",
           "add_run_flags", "batch_that_runs",
           "check_config",
           "check_device", "check_out", "cli_main", "config_from_args", "entry_point", "cpu_name",
           "flag", "hardware", "has_metrics", "keep_earlier", "logged_steps", "no_repeats",
           "pending", "precision_info", "precision_text", "prepare", "progress", "mean_std_range",
           "read_jsonl",
           "read_run_files", "refuse_duplicates", "refuse_existing", "resolve_device",
           "run_configs", "run_folders", "run_main", "run_parser", "setting_key", "split_list",
           "stop_if_diverged", "train_epoch", "version_info"]


# --------------------------------------------------------------------------- option checks
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(k: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= k), \
        f"an integer >= {k}"


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
    "procs": _int_at_least(1),
    "stack": _int_at_least(1),
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
    for f in dataclasses.fields(cfg):
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
    """``auto``, ``cpu``, or a CUDA device this machine has.

    Raises:
        WnormError: another name, or CUDA asked for where there is none.
    """
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
        why = "no CUDA build" if torch.version.cuda is None else "no GPU found"
        raise WnormError(f"--device {name}: CUDA is not available here (torch "
                         f"{torch.__version__}, {why}); use --device cpu or auto")
    if not 0 <= index < torch.cuda.device_count():
        raise WnormError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; a CUDA device this machine lacks is an error."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def no_repeats(items: list[Any], option: str) -> list[Any]:
    """``items``, refusing a value given twice (it would train or count one run twice)."""
    seen = set()
    for x in items:
        if x in seen:
            raise WnormError(f"{option}: {x!r} is given twice; each value once")
        seen.add(x)
    return items


def split_list(text: str, kind: type, option: str) -> list[Any]:
    """A comma-separated option as a list: spaces ignored, at least one item, none twice.

    Example:
        >>> split_list("0, 1,2", int, "--seeds")
        [0, 1, 2]
    """
    try:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise WnormError(f"{option}: expected a comma-separated list of {kind.__name__}; "
                         f"got {text!r}") from e
    if not items:
        raise WnormError(f"{option}: expected at least one value; got {text!r}")
    return no_repeats(items, option)


# --------------------------------------------------------------------------- argparse
def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[
        str(f.type).replace(" | None", "").strip()]


def add_options(p: argparse.ArgumentParser, config_cls: type, *, skip: set[str] = frozenset(),
                defaults: dict[str, Any] | None = None) -> None:
    """One ``--field-name`` per field of ``config_cls`` but ``skip`` (bools get ``--no-...``
    too); the default shown is ``defaults[field]`` or the dataclass's own. An option not given
    stays ``None`` so that :func:`config_from_args` can tell it from a default."""
    shown = {f.name: f.default for f in dataclasses.fields(config_cls)} | (defaults or {})
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = _field_type(f)
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {shown[f.name]})")
        else:
            p.add_argument(flag(f.name), type=kind, default=None,
                           help=f"(default: {shown[f.name]})")


def config_from_args(config_cls: type, args: argparse.Namespace,
                     defaults: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """``config_cls`` from its own defaults, then ``defaults``, then the options given, then
    ``fixed``; checked against :data:`RULES`.

    Raises:
        WnormError: a value outside :data:`RULES` (the scripts pass it to ``parser.error``).
    """
    values: dict[str, Any] = dict(defaults or {})
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = config_cls(**(values | fixed))
    check_config(cfg)
    return cfg


# --------------------------------------------------------------------------- versions
def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str, world: int = 1) -> str:
    """One line: the accelerator (or CPU), thread count and process count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        acc = torch.cuda.get_device_name(torch.device(device).index or 0)
    else:
        n = torch.get_num_threads()
        acc = f"CPU {cpu_name()}, {n} torch thread{'s' if n > 1 else ''}"
    return acc + (f" x{world} processes" if world > 1 else "")


def version_info(device: str, world: int = 1) -> dict[str, Any]:
    """The code version and machine of a run (for ``version.json``): ``git_dirty`` says whether
    wnorm/ or experiments/ differ from the commit. Where the checkout has no git (a copy sent
    to another machine), ``$EXPERIMENTS_GIT_COMMIT`` names the commit."""
    import numpy

    # the code that runs: a run writing into results/ must not call its own tree dirty
    dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", ":(top)wnorm",
                  ":(top)experiments"])
    return {
        "git_commit": _git(["rev-parse", "HEAD"]) or os.environ.get("EXPERIMENTS_GIT_COMMIT"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "wnorm": wnorm.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hardware(device, world),
        "cpu_count": os.cpu_count(),
        "world_size": world,
        "argv": sys.argv,
    }


def precision_info(device: torch.device, *, autocast: torch.dtype | None = None,
                   channels_last: bool = False, compile: str = "off") -> dict[str, Any]:
    """What arithmetic a run used (for ``config.json``): parameters stay float32; ``autocast``
    is the autocast dtype or None; TF32 is what the CUDA backends allowed (None on a CPU)."""
    cuda = device.type == "cuda"
    return {
        "params": "float32",
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
        "channels_last": channels_last,
        "compile": compile,
    }


def precision_text(p: dict[str, Any] | None) -> str:
    """How a run computed, in words, from its recorded :func:`precision_info` (runs that
    recorded none ran in float32).

    Example:
        >>> precision_text({"autocast": "bfloat16", "tf32_matmul": True, "tf32_cudnn": True,
        ...                 "channels_last": True, "compile": "default"})
        'bfloat16 autocast, TF32 matmul on, cuDNN on, channels-last, torch.compile (default)'
    """
    p = p or {}
    parts = [f"{p['autocast']} autocast" if p.get("autocast") else "float32"]
    if p.get("tf32_matmul") is not None:
        parts.append(f"TF32 matmul {'on' if p['tf32_matmul'] else 'off'}, cuDNN "
                     f"{'on' if p.get('tf32_cudnn') else 'off'}")
    if p.get("channels_last"):
        parts.append("channels-last")
    if p.get("compile") not in (None, "off"):
        parts.append(f"torch.compile ({p['compile']})")
    return ", ".join(parts)


# --------------------------------------------------------------------------- writing
class RunLog:
    """Prints a line (through tqdm, so progress bars survive) and appends it to ``log.txt``."""

    def __init__(self, path: Path | None, echo: TextIO | None | bool = True) -> None:
        self.file = open(path, "w") if path is not None else None  # noqa: SIM115
        self.echo = echo  # True: sys.stdout as it is when a line is printed

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self.echo is True:
            _tqdm_write(line, sys.stdout)
        elif self.echo not in (None, False):
            _tqdm_write(line, self.echo)  # type: ignore[arg-type]
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _tqdm_write(line: str, stream: TextIO) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=stream)


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on stderr (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def has_metrics(folder: Path) -> bool:
    m = folder / "metrics.jsonl"
    return m.is_file() and m.stat().st_size > 0


def entry_point(main: Callable[[], Any], again: str = "--resume trains them again and keeps "
                "the finished ones") -> NoReturn:
    """``sys.exit(main())`` for an entry point, with Ctrl-C said in one line (no traceback):
    each run folder keeps the epochs it wrote; ``again`` says how the script goes on (a
    script without ``--resume`` says its own way)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted: each run folder keeps the epochs it wrote (reports list such runs "
              f"as incomplete; {again})", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def check_out(folder: str | Path, what: str) -> Path:
    """``folder`` as a Path, checked to be a folder or one that ``mkdir(parents=True)`` can make.

    Checked before any work: otherwise ``mkdir`` fails after training or loading, with a
    traceback, on a regular file at ``folder`` or above it, or on a dangling symlink (which
    ``exists()`` calls absent, yet ``mkdir`` cannot replace).

    Raises:
        WnormError: naming the first such path and saying a folder for ``what`` was expected.
    """
    folder = Path(folder)
    for up in (folder, *folder.parents):
        if up.is_symlink() and not up.exists():
            raise WnormError(f"{up} is a symlink to {os.readlink(up)}, which does not exist; "
                             f"expected a folder for {what} (--out)")
        if up.exists():
            if not up.is_dir():
                raise WnormError(f"{up} is a file; expected a folder for {what} (--out)")
            break
    return folder


def batch_that_runs(cfg: Any, n: int) -> Any:
    """``cfg`` with its batch size and its data-init batch (``init_examples``, where it has
    one) at most ``n``, the training set's size: a larger batch runs as the whole set, and the
    run folder's config.json and the reports say what ran."""
    for k in _CLAMPED:
        if 0 < n < getattr(cfg, k, 0):
            cfg = dataclasses.replace(cfg, **{k: n})
    return cfg


def keep_earlier(path: Path) -> Path | None:
    """Move an existing ``path`` aside to ``<stem>-<k><suffix>`` (the first free k) before it
    is written again: an earlier invocation's record (classify_gpu's harness.json, measured
    timings) into the same folder is kept, not replaced. Returns where it went."""
    if not path.exists():
        return None
    k = 1
    while (aside := path.with_name(f"{path.stem}-{k}{path.suffix}")).exists():
        k += 1
    path.rename(aside)
    return aside


def refuse_existing(folders: list[Path], overwrite: bool) -> None:
    """Refuse to train into run folders that are not folders (:func:`check_out`), or that
    already hold metrics, unless ``overwrite``.

    Raises:
        WnormError: naming the first such folder (and how many there are).
    """
    for f in folders:
        check_out(f, "the runs")
    if overwrite:
        return
    taken = [f for f in folders if has_metrics(f)]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise WnormError(f"run folder {taken[0]}{more} already holds a run (metrics.jsonl); "
                         "choose another --out, move it away, or pass --overwrite to replace it")


#: the file that marks a run folder whose training returned
DONE = "done.json"
#: fields that may differ between a finished run and a resumed command: where and how fast it
#: runs, not what it computes
_NOT_SETTINGS = frozenset({"out", "threads", "device", "procs", "data_dir", "download"})
#: fields a run records clamped to its training set (:func:`batch_that_runs`): recorded as the
#: set's size (config.json's ``data.train``), a larger value asked for now is the same setting
_CLAMPED = frozenset({"batch_size", "init_examples"})


def _changed(folder: Path, cfg: Any) -> list[str]:
    """The fields of ``cfg`` that a finished run in ``folder`` trained with another value.

    An option not given (``None``) is its default as ``cfg.resolved()`` makes it explicit
    (``--decay-start`` epochs / 2, ``--zca`` by dataset, ``--bf16`` by device), or stays
    ``None`` (``--train-subset``: the whole set): a run that had another value is another
    setting. An ``auto`` (device, compile mode) is whatever it resolved to there.
    """
    try:
        ran = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise WnormError(f"{folder} is marked finished ({DONE}) but its config.json is missing "
                         "or unreadable; move the folder away, or pass --overwrite") from None
    data = ran.get("data")
    whole = data.get("train") if isinstance(data, dict) else None
    asked = dataclasses.asdict(cfg)
    full = dataclasses.asdict(cfg.resolved()) if callable(getattr(cfg, "resolved", None)) \
        else asked
    changed = []
    for k, want in asked.items():
        if k in _NOT_SETTINGS or want == "auto" or k not in ran:
            continue
        if want is None:
            want = full.get(k)  # the default, as the run records it
        got = ran[k]
        if want is None and got is not None:
            changed.append(f"{flag(k)} {got!r} there, not given now")
            continue
        # only a value clamped to the whole set is no change: a run that asked for a smaller
        # batch than the set trained with that batch, and a larger one now computes otherwise
        if got != want and not (k in _CLAMPED and got == whole and isinstance(got, int)
                                and got < want):
            changed.append(f"{flag(k)} {got!r} there, {want!r} now")
    return changed


def pending(configs: list[Any], folder_of: Callable[[Any], Path], *, overwrite: bool,
            resume: bool) -> list[Any]:
    """The configs left to train: every one, after :func:`refuse_existing`; with ``resume``,
    those whose run folder (``folder_of(cfg)``) holds no finished run (:data:`DONE`), an
    unfinished one to be trained again from its start (its epochs are replaced).

    A finished run is kept only for the same setting: one trained with another value of a
    field that changes what it computes is refused, not silently mixed into a report.

    Raises:
        WnormError: ``overwrite`` and ``resume`` both; a folder in the way (:func:`check_out`);
            a run folder that holds a run (without either flag); a finished run of another
            setting (naming the folder and the fields).
    """
    folders = [folder_of(c) for c in configs]
    if not resume:
        refuse_existing(folders, overwrite)
        return list(configs)
    if overwrite:
        raise WnormError("--resume keeps finished runs and --overwrite replaces them; pass one")
    for f in folders:
        check_out(f, "the runs")
    todo = []
    for c, f in zip(configs, folders):
        if not (f / DONE).is_file():
            todo.append(c)
        elif changed := _changed(f, c):
            raise WnormError(f"--resume: {f} finished with another setting ({'; '.join(changed)})"
                             "; run it again with --overwrite, or give another --out")
    if len(todo) < len(configs):
        print(f"resume: {len(configs) - len(todo)} of {len(configs)} runs finished already and "
              f"are kept; training {len(todo)}", flush=True)
    return todo


class RunFolder:
    """``<out>/<name>/`` with ``config.json``, ``version.json``, ``log.txt``, ``metrics.jsonl``.

    A context manager: ``log(msg)`` prints and appends to ``log.txt``, ``write(row)`` appends
    one JSON line to ``metrics.jsonl``. ``config`` is a dataclass (written with ``extra``
    merged in) or a dict.

    Raises:
        WnormError: the folder already holds a run and ``overwrite`` is False (nothing in it is
            touched).
    """

    def __init__(self, path: Path, config: Any, device: torch.device | str,
                 extra: dict[str, Any] | None = None, *, echo: TextIO | bool = True,
                 overwrite: bool = False, world: int = 1) -> None:
        self.path = Path(path)
        refuse_existing([self.path], overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DONE).unlink(missing_ok=True)  # a run replaced is unfinished until it ends
        base = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        (self.path / "config.json").write_text(json.dumps(base | (extra or {}), indent=2) + "\n")
        (self.path / "version.json").write_text(
            json.dumps(version_info(str(device), world), indent=2) + "\n")
        self.log = RunLog(self.path / "log.txt", echo=echo)
        self._metrics = (self.path / "metrics.jsonl").open("w")

    def write(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()
        self.log.close()

    def finish(self) -> None:
        """Close, marking the run finished (:data:`DONE`): ``--resume`` keeps it."""
        self.close()
        (self.path / DONE).write_text(json.dumps(
            {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        # an exception (Ctrl-C, a crash) leaves the run unfinished: --resume trains it again
        if kind is None:
            self.finish()
        else:
            self.close()


# --------------------------------------------------------------------------- training
def prepare(cfg: Any) -> torch.device:
    """Check ``cfg`` (:func:`check_config`), set its torch CPU ``threads`` (when given) and
    return its resolved ``device``.

    Raises:
        WnormError: a bad option, named.
    """
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def train_epoch(opt: torch.optim.Optimizer, step_loss: Callable[[torch.Tensor], tuple[Any, ...]],
                perm: torch.Tensor, batch: int, steps: int, desc: str, progress_bar: bool
                ) -> tuple[list[list[float]], float]:
    """``steps`` optimizer steps on the batches ``perm[s * batch:(s + 1) * batch]``.

    ``step_loss(idx)`` returns the scalar loss to minimize, then any other per-step scalars to
    record. They stay on the device until the epoch ends (one wait, not one per step).

    Returns:
        Each recorded series as a list of floats (the loss first), and the epoch's seconds.
    """
    rows = []
    t0 = time.perf_counter()
    with progress(steps, desc, progress_bar) as bar:
        for s in range(steps):
            loss, *others = step_loss(perm[s * batch:(s + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows.append(torch.stack([loss.detach().float(), *(o.float() for o in others)]))
            if bar is not None:
                bar.update(1)
    series = torch.stack(rows).T.tolist()  # the epoch's one wait for the device
    return series, time.perf_counter() - t0


def stop_if_diverged(folder: RunFolder, values: list[float], step: int, epoch: int, cfg: Any,
                     what: str) -> bool:
    """Whether the epoch's per-step ``values`` (steps ``step + 1`` on) hold a NaN or inf; if
    so, the run's last metrics line ``{"epoch", "diverged": true, "step", "loss", "steps"}``
    names the first bad step and the log says that ``what`` diverged."""
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is None:
        return False
    at = step + bad + 1
    folder.write({"epoch": epoch, "diverged": True, "step": at, "loss": str(values[bad]),
                  "steps": at})
    folder.log(f"epoch {epoch}/{cfg.epochs}: {what} became {values[bad]} at step {at} (lr "
               f"{cfg.lr:g}): diverged, stopping this run (a lower --lr may help)")
    return True


def logged_steps(values: list[float], step: int, every: int) -> list[list[Any]]:
    """``[step, value]`` for each of the epoch's steps (numbered from ``step + 1``) that is a
    multiple of ``every``.

    Example:
        >>> logged_steps([0.5, 0.4, 0.3], 10, 2)
        [[12, 0.4]]
    """
    return [[step + i + 1, v] for i, v in enumerate(values) if (step + i + 1) % every == 0]


# --------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it does not exist); a bad line names its place.

    A last line without its newline that does not parse is a line being written (or a run
    killed while writing it): it is left out, not an error.

    Raises:
        WnormError: a line before the last is not JSON.
    """
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines):  # no newline after it: unfinished
                    break
                raise WnormError(f"{path}:{i}: not a JSON line ({e})") from e
    return rows


def read_run_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, version, metrics)`` of a run folder, whatever experiment wrote it.

    Raises:
        WnormError: ``config.json`` is missing or not JSON.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WnormError(f"{folder}: config.json is not readable JSON ({e})") from e
    vpath = folder / "version.json"
    version = json.loads(vpath.read_text()) if vpath.is_file() else {}
    return config, version, read_jsonl(folder / "metrics.jsonl")


@dataclasses.dataclass
class RunRecord:
    """A run folder as the reports read it back: its config, version and metrics rows."""

    folder: Path
    config: dict[str, Any]
    version: dict[str, Any]
    metrics: list[dict[str, Any]]

    @classmethod
    def read(cls, folder: Path) -> Any:
        """The run in ``folder`` (see :func:`read_run_files`)."""
        return cls(folder, *read_run_files(folder))

    @property
    def variant(self) -> str:
        return str(self.config["variant"])

    @property
    def diverged(self) -> bool:
        """The run stopped on a NaN/inf loss (its last metrics line says so)."""
        return bool(self.metrics and self.metrics[-1].get("diverged"))


def run_folders(paths: list[str | Path], who: str = "report") -> list[Path]:
    """The run folders (with ``config.json``) named in ``paths`` or directly inside them, each
    once (a folder reached twice, by the same or another path, counts once).

    Raises:
        WnormError: a path does not exist or is not a folder.
    """
    out: dict[Path, Path] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise WnormError(f"{who}: {p} does not exist")
        if not p.is_dir():  # a metrics.jsonl or config.json named by mistake
            raise WnormError(f"{who}: {p} is a file; expected a run folder (with config.json) "
                             "or a folder of run folders")
        found = [p] if (p / "config.json").is_file() else sorted(
            d for d in p.iterdir() if (d / "config.json").is_file())
        for d in found:
            out.setdefault(d.resolve(), d)
    return list(out.values())


def mean_std_range(values: list[float], digits: int = 2) -> str:
    """``mean ± std (min to max)`` over seeds, NaNs left out ("n/a" when nothing is left)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return (f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f} to {max(values):.{digits}f})")


def refuse_duplicates(runs: list[Any], key: Callable[[Any], tuple[str, ...]], what: str) -> None:
    """Two different folders for the same ``key(run)`` (e.g. variant and seed) in one setting
    would count one configuration twice: refuse, naming both.

    Raises:
        WnormError: naming both folders.
    """
    seen: dict[Any, Path] = {}
    for r in runs:
        k = (r.setting() if callable(r.setting) else r.setting, key(r))
        if k in seen:
            raise WnormError(f"report: {seen[k]} and {r.folder} are the same {what} "
                             f"({', '.join(map(str, key(r)))}) with the same settings; report "
                             "one of them")
        seen[k] = r.folder


def setting_key(config: dict[str, Any], skip: frozenset[str] | set[str]
                ) -> tuple[tuple[str, str], ...]:
    """The whole config but ``skip``, hashable; 7 and 7.0 (old integer ``decay_start``) agree,
    and a missing ``world_size`` (older runs) is 1.

    Example:
        >>> setting_key({"epochs": 7, "seed": 1}, {"seed"}) == setting_key({"epochs": 7.0}, set())
        True
    """
    c = {"world_size": 1} | config
    return tuple(sorted((k, json.dumps(float(v) if isinstance(v, int) and not isinstance(v, bool)
                                       else v, sort_keys=True))
                        for k, v in c.items() if k not in skip))


# --------------------------------------------------------------------------- section-6 scripts
#: options every vae/seq/dqn script has beside its config's own fields
_RUN_OPTIONS = {"experiment", "variant", "seed", "out", "threads", "device"}


def run_parser(script: str, doc: str, config_cls: type, *, variants: tuple[str, ...],
               seeds: str) -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.<script>`` (described by ``doc``'s first line):
    ``--variant(s) --seeds --out --threads --device --quick --overwrite --progress`` and one
    option per other field of ``config_cls`` (default: the dataclass's, or the ``--quick``
    value when that flag is given)."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{script}",
                                description=doc.split("\n")[0])
    p.add_argument("--variant", choices=variants, default=None,
                   help="train one variant (overrides --variants)")
    p.add_argument("--variants", default=",".join(variants),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default=seeds, help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=config_cls.out, help="parent folder of the run folders "
                                                         "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on 2 shared cores more ran slower)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that run in seconds (for tests); explicit options still win")
    add_run_flags(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on stderr (default: on)")
    add_options(p, config_cls, skip=_RUN_OPTIONS)
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--resume``: what to do with run folders that already hold a run."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace run folders that already hold a run (default: refuse them)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs that finished (same settings) and train the others again "
                        "from their start: an interrupted command goes on where it stopped")


def run_configs(config_cls: type, args: argparse.Namespace, quick: dict[str, Any],
                variants: tuple[str, ...],
                grid: Callable[[str, int], list[dict[str, Any]]] | None = None) -> list[Any]:
    """One checked config per entry of ``grid(variant, seed)`` (default: the one entry
    ``{"variant": variant, "seed": seed}``) for the variants and seeds asked for: the
    dataclass's defaults, then ``quick`` (with ``--quick``), then the options given, then the
    entry's fixed fields.

    Raises:
        WnormError: an unknown variant or a bad value, named (for ``parser.error``).
    """
    chosen = [args.variant] if args.variant else split_list(args.variants, str, "--variants")
    bad = [v for v in chosen if v not in variants]
    if bad:
        raise WnormError(f"--variants: unknown {bad}; expected some of {list(variants)}")
    seeds = split_list(args.seeds, int, "--seeds")
    base = {"out": args.out, "threads": args.threads, "device": args.device}
    grid = grid or (lambda v, s: [{"variant": v, "seed": s}])
    return [config_from_args(config_cls, args, quick if args.quick else None, **(base | fixed))
            for s in seeds for v in chosen for fixed in grid(v, s)]


def cli_main(p: argparse.ArgumentParser, argv: list[str] | None,
             configs_from: Callable[[argparse.Namespace], list[Any]],
             train_all: Callable[[list[Any], argparse.Namespace], object]) -> int:
    """A training script's ``main``: parse ``argv``, build the configs, train them.

    A WnormError from ``configs_from(args)`` (a bad option) goes to ``p.error``: exit status 2
    before any data is loaded or any folder touched. One from ``train_all(configs, args)``
    (data, a taken run folder) is printed as ``error: ...`` on stderr.

    Returns:
        0, or 2 when training raised a WnormError.
    """
    args = p.parse_args(argv)
    try:
        configs = configs_from(args)
    except WnormError as e:
        p.error(str(e))
    try:
        train_all(configs, args)
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_main(p: argparse.ArgumentParser, argv: list[str] | None,
             configs_from: Callable[[argparse.Namespace], list[Any]],
             run_name: Callable[[Any], str], load: Callable[[Any], tuple[Any, ...]],
             train_one: Callable[..., RunFolder]) -> int:
    """:func:`cli_main` for a script with one run folder per config (vae, seq, dqn).

    The configs left to train (:func:`pending`: run folders that already hold a run are
    refused without ``--overwrite``, finished ones kept with ``--resume``) are chosen before
    ``load(configs[0])`` reads the data, once; then ``train_one(cfg, *data, overwrite=...,
    progress_bar=...)`` trains each and its folder is printed.
    """
    def train_all(configs: list[Any], args: argparse.Namespace) -> None:
        todo = pending(configs, lambda c: Path(c.out) / run_name(c), overwrite=args.overwrite,
                       resume=args.resume)
        if not todo:
            return
        data = load(todo[0])
        for cfg in todo:
            folder = train_one(cfg, *data, overwrite=args.overwrite or args.resume,
                               progress_bar=args.progress)
            print(f"run folder: {folder.path}")

    return cli_main(p, argv, configs_from, train_all)
