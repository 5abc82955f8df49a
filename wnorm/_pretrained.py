"""Checkpoint folders in transformers' ``save_pretrained`` layout, for ``wnorm convert``.

A folder holds ``model.safetensors``, or shards named by ``model.safetensors.index.json``
(its ``weight_map``: key -> shard file), beside ``config.json`` and whatever else the model
saved. A weight's g and v may sit in different shards, so the folder is read whole, converted
as one state dict, and written back with each key in the shard its source key was in; every
other file is copied as it is. The new folder is written under a temporary name beside OUT
and renamed into place (into an empty OUT, its files are moved: a shell may be in it), so a
failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from . import _layouts
from ._files import first_line, safetensors_module
from .errors import WnormError

__all__ = ["WEIGHTS", "INDEX", "check_output_folder", "convert_folder"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_LAYOUT = f"save_pretrained layout: {WEIGHTS}, or shards named by {INDEX}, beside config.json"


def _other_weights(name: str) -> bool:
    """Weights of another format (PyTorch pickles, TensorFlow, Flax) that this command does
    not convert: copied unconverted, they would contradict the converted safetensors."""
    return (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))
            or name.startswith("tf_model") and name.endswith((".h5", ".h5.index.json"))
            or name.startswith("flax_model") and name.endswith((".msgpack",
                                                               ".msgpack.index.json")))


def _read(src: Path) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any] | None,
                              dict[str, dict[str, str] | None]]:
    """``(state_dict, shard of each key, index or None, metadata of each shard)``."""
    safetensors_module(src / WEIGHTS)  # says how to install it when it is missing
    from safetensors import safe_open

    single, index_path = src / WEIGHTS, src / INDEX
    if single.exists() and index_path.exists():
        raise WnormError(f"{src}: holds both {WEIGHTS} and {INDEX}; expected one of them "
                         f"({_LAYOUT}): remove the stale one")
    if single.exists():
        index, files = None, [WEIGHTS]
    elif index_path.exists():
        expected = f"{index_path}: expected JSON with a 'weight_map' of tensor names to shard files"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise WnormError(f"{expected}; got {first_line(e)}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(f, str) for k, f in weight_map.items()):
            raise WnormError(f"{expected}; got {str(index)[:80]!r}")
        files = list(dict.fromkeys(weight_map.values()))
        bad = [f for f in files if Path(f).name != f or f.startswith(".")]
        if bad:
            raise WnormError(f"{index_path}: expected shard file names in the folder; got {bad}")
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise WnormError(f"{index_path}: names shard files the folder lacks: {missing}")
    else:
        others = sorted(p.name for p in src.iterdir() if _other_weights(p.name))
        got = f"only {others}, which this command does not convert" if others else (
            f"neither (files: {sorted(p.name for p in src.iterdir())[:10]})")
        raise WnormError(f"{src}: expected a transformers checkpoint folder ({_LAYOUT}); "
                         f"got {got}")
    state: dict[str, Tensor] = {}
    shard_of: dict[str, str] = {}
    meta: dict[str, dict[str, str] | None] = {}
    for name in files:
        try:
            with safe_open(str(src / name), framework="pt", device="cpu") as f:
                meta[name] = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise WnormError(f"{src / name}: not a readable safetensors file; got "
                             f"{first_line(e)}") from None
        for key, t in tensors.items():
            if key in state:
                raise WnormError(f"{src}: '{key}' is in both {shard_of[key]} and {name}; "
                                 "expected each tensor in one shard")
            state[key], shard_of[key] = t, name
    if index is not None:
        wrong = [k for k, f in index["weight_map"].items() if shard_of.get(k) != f]
        if wrong:
            k = wrong[0]
            raise WnormError(f"{src / INDEX}: says '{k}' is in {index['weight_map'][k]}; got it "
                             f"in {shard_of.get(k, 'no shard')} ({len(wrong)} such keys)")
    return state, shard_of, index, meta


def _shards(out: dict[str, Tensor], shard_of: dict[str, str]) -> dict[str, dict[str, Tensor]]:
    """``out`` split into the shards its source keys came from: a renamed g goes where the
    source's g was, v (or the plain w made from a pair) where v was."""
    by_role = {_layouts.base_and_role(k): f for k, f in shard_of.items()}
    first = next(iter(shard_of.values()))
    shards: dict[str, dict[str, Tensor]] = {}
    for key, t in out.items():
        base, role = _layouts.base_and_role(key)
        name = shard_of.get(key) or next(
            (by_role[(base, r)] for r in (role, "v", "w", "g") if (base, r) in by_role), first)
        shards.setdefault(name, {})[key] = t
    return shards


def check_output_folder(src: Path, dst: Path) -> None:
    """OUT must be a new folder (or an empty one) outside IN, in an existing directory."""
    if dst.exists() and not dst.is_dir():
        raise WnormError(f"{dst}: expected a new folder for the converted checkpoint (IN {src} "
                         "is a folder); got a file")
    inside = Path(os.path.realpath(dst))
    if inside == Path(os.path.realpath(src)) or Path(os.path.realpath(src)) in inside.parents:
        raise WnormError(f"{dst}: expected a folder outside the input folder {src}")
    if dst.is_dir() and any(dst.iterdir()):
        raise WnormError(f"{dst}: expected a new or empty folder; got a folder with files "
                         "(nothing is overwritten: choose another name or empty it)")
    if not dst.parent.is_dir():
        raise WnormError(f"{dst}: expected an existing directory '{dst.parent}' to write into; "
                         "got no such directory")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def convert_folder(
    src: Path, dst: Path, to: str, dim: Any = _layouts.KEEP
) -> tuple[int, list[str]]:
    """Write folder ``src`` converted to layout ``to`` as the new folder ``dst``.

    Returns ``(weights_converted, notes)``: the notes name the files not copied."""
    check_output_folder(src, dst)
    state, shard_of, index, meta = _read(src)
    try:
        out, n = _layouts.convert(state, to, dim)
    except WnormError as e:  # say which folder (and shard) holds the key named
        shard = next((f" (in {shard_of[k]})" for k in shard_of if f"'{k}'" in str(e)), "")
        raise WnormError(f"{src}: {e}{shard}") from None
    st = safetensors_module(src / WEIGHTS)
    skipped = sorted(p.name for p in src.iterdir() if _other_weights(p.name))
    weights = {WEIGHTS, INDEX} | set(shard_of.values())
    # "." or "out/..": a name to put the temporary beside
    tmp = Path(os.path.abspath(dst))
    tmp = tmp.with_name(f".{tmp.name}.{secrets.token_hex(6)}.tmp")
    moved: list[Path] = []
    try:
        tmp.mkdir()
        for entry in src.iterdir():
            if entry.name in weights or entry.name in skipped:
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)  # follows links (the hub cache's blobs)
        shards = _shards(out, shard_of)
        for name, tensors in shards.items():
            # safetensors refuses shared or non-contiguous storage: one copy per tensor
            flat = {k: t.detach().contiguous().clone() for k, t in tensors.items()}
            st.save_file(flat, str(tmp / name), metadata=meta.get(name))
            _fsync(tmp / name)
        if index is not None:
            index = dict(index)
            info = dict(index.get("metadata") or {})
            if "total_size" in info:
                info["total_size"] = sum(t.numel() * t.element_size() for t in out.values())
            if "total_parameters" in info:
                info["total_parameters"] = sum(t.numel() for t in out.values())
            index["metadata"] = info
            index["weight_map"] = {k: f for f, ts in shards.items() for k in ts}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _fsync(tmp / INDEX)
        if dst.is_dir():  # empty (checked): filled, not replaced, as a shell may be in it
            for entry in sorted(tmp.iterdir()):
                if os.path.lexists(dst / entry.name):  # it gained files meanwhile
                    raise FileExistsError(17, "File exists", str(dst / entry.name))
                os.rename(entry, dst / entry.name)
                moved.append(dst / entry.name)
            tmp.rmdir()
        else:
            os.rename(tmp, dst)
    except BaseException as e:
        for entry in moved:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, WnormError):
            raise WnormError(f"{dst}: writing the folder failed (nothing written); got "
                             f"{first_line(e)}") from None
        raise
    notes = [f"not copied: {skipped} (weights in another format, not converted; the converted "
             f"weights are in {WEIGHTS if index is None else INDEX})"] if skipped else []
    return n, notes
