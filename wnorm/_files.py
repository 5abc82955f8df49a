"""Checkpoint files for the command line: read and write ``.pt``/``.pth`` and ``.safetensors``,
find the state dicts nested in a training checkpoint, write every file atomically.

A write goes to a temporary file beside its target and is renamed into place, so a failed or
interrupted write leaves no half-written file and keeps the file that was there before.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _layouts
from .errors import WnormError

__all__ = ["find_state_dicts", "convert_checkpoint", "load_checkpoint", "save_checkpoint",
           "safetensors_module", "safetensors_metadata", "check_input", "check_output",
           "first_line"]

_NESTS = ("state_dict", "model", "model_state_dict", "generator", "net", "module", "ema")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def find_state_dicts(checkpoint: Any, key: str | None = None) -> list[tuple[str, ...]]:
    """Where the state dicts are in a checkpoint: a list of key paths (``()`` for a bare one).

    A checkpoint is a state dict (names to tensors) or a dict nesting some, e.g. under
    ``"state_dict"``, ``"model"`` or ``"generator"`` (searched three levels deep, optimizer
    state dicts left out); ``key`` picks one top-level entry.

    Raises:
        WnormError: ``key`` is not in the checkpoint or is not a state dict, or there is no
            state dict at all.

    Example:
        >>> import torch
        >>> from wnorm._files import find_state_dicts
        >>> sd = torch.nn.Linear(2, 2).state_dict()
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict()
        >>> find_state_dicts({"epoch": 3, "model": sd, "opt": opt})
        [('model',)]
    """
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            have = list(checkpoint) if isinstance(checkpoint, Mapping) else []
            raise WnormError(f"expected key {key!r} in the checkpoint; got keys {have}")
        if not _is_state_dict(checkpoint[key]):
            raise WnormError(
                f"checkpoint[{key!r}]: expected a state dict (names to tensors); got "
                f"{type(checkpoint[key]).__name__}"
            )
        return [(key,)]
    if _is_state_dict(checkpoint):
        return [()]
    found: list[tuple[str, ...]] = []

    def walk(obj: Any, path: tuple[str, ...]) -> None:
        # an optimizer's state dict holds per-parameter dicts of tensors (exp_avg, ...), not
        # a model's weights: nothing in it is converted
        if not isinstance(obj, Mapping) or len(path) > 2 or {"state", "param_groups"} <= set(obj):
            return
        for k, v in obj.items():
            if not isinstance(k, str):
                continue
            if _is_state_dict(v):
                found.append(path + (k,))
            else:
                walk(v, path + (k,))

    walk(checkpoint, ())
    # the conventional names first, in _NESTS order, then the rest in file order
    found.sort(key=lambda p: _NESTS.index(p[0]) if p[0] in _NESTS else len(_NESTS))
    if not found:
        raise WnormError(
            "expected a state dict (names to tensors) or a dict nesting one (e.g. under "
            f"{list(_NESTS[:3])}); got {type(checkpoint).__name__}"
            + (f" with keys {list(checkpoint)[:10]}" if isinstance(checkpoint, Mapping) else "")
        )
    return found


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _with(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``obj`` (shallow along ``path``) with ``value`` at ``path``."""
    if not path:
        return value
    new = dict(obj)
    new[path[0]] = _with(obj[path[0]], path[1:], value)
    return new


def convert_checkpoint(
    checkpoint: Any, to: str, key: str | None = None, dim: Any = _layouts.KEEP
) -> tuple[Any, int]:
    """:func:`wnorm.convert_state_dict` on every state dict in ``checkpoint`` (or
    ``checkpoint[key]``), the other entries kept. Returns ``(new_checkpoint, weights_converted)``.

    Example:
        >>> import torch
        >>> from wnorm._files import convert_checkpoint
        >>> sd = torch.nn.utils.weight_norm(torch.nn.Linear(2, 2)).state_dict()
        >>> out, n = convert_checkpoint({"model": sd, "step": 3}, "plain")
        >>> sorted(out["model"]), out["step"], n
        (['bias', 'weight'], 3, 1)
    """
    out, total = checkpoint, 0
    paths = find_state_dicts(checkpoint, key)
    # plain weights are normalized only when no state dict here holds a pair: a plain
    # discriminator beside a weight-normalized generator stays plain
    plain_only = not any(_layouts.has_pair(_get(checkpoint, p)) for p in paths)
    for path in paths:
        where = "".join(f"[{p!r}]" for p in path)
        try:
            sd, n = _layouts.convert(_get(checkpoint, path), to, dim, normalize_plain=plain_only)
        except WnormError as e:
            raise WnormError(f"checkpoint{where}: {e}") from None
        out = _with(out, path, sd)
        total += n
    return out, total


def safetensors_module(path: Path) -> Any:
    """``safetensors.torch``, or an error for ``path`` saying how to install it."""
    try:
        import safetensors.torch as st
    except ImportError:
        raise WnormError(
            f"{path}: reading and writing .safetensors files needs the safetensors package; "
            "pip install safetensors"
        ) from None
    return st


def load_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file: ``.safetensors`` (a flat state dict), otherwise ``torch.load``
    with ``weights_only=True`` (``.pt``/``.pth``: a state dict or a dict nesting one).

    Tensors are loaded on the CPU.

    Returns:
        What the file holds (check it with :func:`find_state_dicts`).

    Raises:
        WnormError: the file does not exist, is not a checkpoint (not a torch or safetensors
            file, or holds no state dict), or safetensors is not installed; the message names
            the file.

    Example:
        >>> import tempfile, os, torch
        >>> from wnorm._files import load_checkpoint, save_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> save_checkpoint({"model": torch.nn.Linear(2, 1).state_dict(), "step": 7}, path)
        >>> sorted(load_checkpoint(path)["model"])
        ['bias', 'weight']
    """
    path = Path(path)
    check_input(path)
    if path.suffix.lower() == ".safetensors":
        st = safetensors_module(path)
        try:
            obj: Any = st.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WnormError(f"{path}: not a readable safetensors file; got {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling, zip and format errors all mean "not a checkpoint"
            blocker = _weights_only_blocker(e)
            if blocker is not None:
                raise WnormError(
                    f"{path}: not a PyTorch checkpoint readable with weights_only=True (which "
                    f"keeps a file from running code): it holds an object of a type torch.load "
                    f"refuses ({blocker}); if you trust its source, load it with "
                    f"torch.load({str(path)!r}, weights_only=False), torch.save only its state "
                    f"dict (e.g. checkpoint['model']) and convert that file"
                ) from None
            reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", _ANSI.sub("", str(e)))
            raise WnormError(
                f"{path}: not a PyTorch checkpoint readable with weights_only=True; got "
                + (f"no pickle torch can read ({reason.group(1).strip()})" if reason
                   else f"neither a zip nor a pickle file ({type(e).__name__}: {first_line(e)})")
            ) from None
    try:
        find_state_dicts(obj)
    except WnormError as e:
        raise WnormError(f"{path}: not a checkpoint: {e}") from None
    return obj


def save_checkpoint(
    obj: Any, path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a checkpoint: ``.safetensors`` for a flat state dict (tensors only), otherwise
    ``torch.save``.

    The file is written beside ``path`` under a temporary name and then renamed into place, so
    a write that fails (disk full, interrupted) leaves no half-written file and keeps the file
    that was at ``path`` before.

    Args:
        obj: a state dict, or (not for ``.safetensors``) a dict nesting some.
        path: the file to write; its suffix picks the format.
        metadata: the ``.safetensors`` header's string metadata (e.g. ``{"format": "pt"}``);
            only for ``.safetensors`` files.

    Raises:
        WnormError: a ``.safetensors`` target for something that is not a flat state dict of
            tensors, metadata that is not names to strings or is for another format,
            safetensors is not installed, or the file cannot be written (``path`` is a
            directory, its directory does not exist, no permission, disk full); the message
            names ``path``.
    """
    path = Path(path)
    check_output(path)
    if path.suffix.lower() != ".safetensors":
        if metadata is not None:
            raise WnormError(f"{path}: metadata is written to .safetensors files only; got a "
                             f"{path.suffix or 'suffix-less'} file")
        _write_atomically(path, lambda tmp: torch.save(obj, tmp))
        return
    st = safetensors_module(path)
    if _is_state_dict(obj):  # flat, but a module's _extra_state may be any object
        others = [f"'{k}' ({type(v).__name__})" for k, v in obj.items()
                  if not isinstance(v, Tensor)]
        if others:
            raise WnormError(
                f"{path}: a .safetensors file holds tensors only; got {', '.join(others[:10])} "
                "(a module's extra state, which only torch.save stores): write a .pt file")
    if not _is_state_dict(obj):
        raise WnormError(
            f"{path}: a .safetensors file holds a flat state dict (names to tensors); got "
            f"{type(obj).__name__}"
            + (f" with keys {list(obj)[:10]}" if isinstance(obj, Mapping) else "")
            + "; pick the state dict (wnorm convert --key KEY) or write a .pt file"
        )
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise WnormError(f"{path}: expected metadata of names to strings; got {metadata!r}")
        metadata = dict(metadata)
    # safetensors refuses shared or non-contiguous storage: give it one copy per tensor
    flat = {k: v.detach().contiguous().clone() for k, v in obj.items()}
    _write_atomically(path, lambda tmp: st.save_file(flat, tmp, metadata=metadata))


def safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The string metadata in a ``.safetensors`` file's header (None when it has none)."""
    path = Path(path)
    safetensors_module(path)  # says how to install it when it is missing
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:  # safetensors raises its own error types
        raise WnormError(f"{path}: not a readable safetensors file; got {first_line(e)}") from None


# --------------------------------------------------------------------------- files: helpers
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal escape codes."""
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _weights_only_blocker(e: BaseException) -> str | None:
    """What made ``torch.load(weights_only=True)`` refuse a file, from torch's message: e.g.
    ``Unsupported global: GLOBAL argparse.Namespace``; None for other errors."""
    text = _ANSI.sub("", str(e))
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"Unsupported (?:global|class): (?:GLOBAL )?[\w.]+", text)
    # anything else ("Unsupported operand", a bad load key) is a file that is no pickle at all:
    # advice to unpickle it without weights_only would be wrong, and unsafe
    return found.group(0) if found else None


def check_input(path: Path) -> None:
    """Refuse a checkpoint path that is not a readable regular file, naming it."""
    if path.is_dir():
        raise WnormError(f"{path}: expected a checkpoint file; got a directory")
    if not path.is_file():
        got = "no such file" if not path.exists() else "not a regular file"
        raise WnormError(f"{path}: expected a checkpoint file; got {got}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise WnormError(f"{path}: expected a readable checkpoint file; got "
                         f"{e.strerror or first_line(e)}") from None


def check_output(path: Path) -> None:
    """Refuse an output path that cannot become a file: a directory, or in a missing directory."""
    if path.is_dir():
        raise WnormError(f"{path}: expected a file name to write; got a directory")
    parent = path.parent
    if not parent.is_dir():
        got = "no such directory" if not parent.exists() else "not a directory"
        raise WnormError(f"{path}: expected an existing directory '{parent}' to write into; "
                         f"got {got}")


def _temporary_beside(dest: Path) -> Path:
    """Create an empty file with a new name in ``dest``'s directory (mode as the umask says)."""
    while True:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. Through a
    symbolic link, the file it points to is replaced (the link stays).
    """
    dest = Path(os.path.realpath(path))
    try:
        tmp = _temporary_beside(dest)
    except OSError as e:
        raise WnormError(f"{path}: cannot write a file there; got "
                         f"{e.strerror or first_line(e)}") from None
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:  # on disk before the rename: no empty file after a crash
            os.fsync(f.fileno())
        if dest.exists():
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, WnormError):
            kept = "the file there before is kept" if dest.exists() else "no file written"
            raise WnormError(f"{path}: writing failed ({kept}); got {first_line(e)}") from None
        raise
