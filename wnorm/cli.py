"""The ``wnorm`` command line.

    wnorm convert IN OUT --to {plain,torch-old,torch-new,wnorm} [--dim DIM] [--key KEY]

IN is a ``.pt``/``.pth`` or ``.safetensors`` file (OUT: a file), or a transformers checkpoint
folder in the ``save_pretrained`` layout (OUT: a new folder). Bad input prints
``wnorm: error: <message>`` to stderr and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._layouts import FORMATS, KEEP
from .errors import WnormError

__all__ = ["main"]


def _axis(text: str) -> Any:
    """``none`` or an axis >= 0; ``keep`` too where ``text`` is all of ``--dim``."""
    if text.lower() in (KEEP, "none"):
        return KEEP if text.lower() == KEEP else None
    try:
        dim = int(text)
    except ValueError:
        dim = -1
    if dim < 0:
        raise argparse.ArgumentTypeError(
            f"expected 'keep', 'none' (one norm over the whole tensor), an axis >= 0 or "
            f"KEY=AXIS,... (those weights only); got {text!r}")
    return dim


def _dim(text: str) -> Any:
    """``--dim``: ``keep``, ``none``, an axis >= 0, or ``KEY=AXIS,...`` (per weight)."""
    if "=" not in text:
        return _axis(text)
    dims = {}
    for item in text.split(","):
        key, eq, axis = item.strip().rpartition("=")
        if key in dims:  # the last would win without a word
            raise argparse.ArgumentTypeError(f"{key!r} is named twice; got {text!r}")
        dims[key] = _axis(axis) if eq and key else KEEP
        if dims[key] == KEEP:
            raise argparse.ArgumentTypeError(
                f"expected KEY=AXIS,... with AXIS 'none' or an axis >= 0; got {item!r}")
    return dims


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wnorm", description="Weight normalization (Salimans & Kingma, 2016) tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    conv = sub.add_parser(
        "convert",
        help="rewrite a checkpoint in another weight-norm layout",
        description="Rewrite a checkpoint's weights in another weight-norm layout: plain w, "
        "PyTorch's old API (_g/_v), its new one (parametrizations.<name>.original0/1), or "
        "wnorm's (the old API's names). Reads and writes .pt/.pth and .safetensors files and "
        "transformers checkpoint folders (save_pretrained layout).",
    )
    conv.add_argument("input", metavar="IN", help="checkpoint file or folder to read")
    conv.add_argument("output", metavar="OUT",
                      help="file to write (.pt, .pth or .safetensors; an existing file only "
                      "with --force), or a new folder for a folder IN")
    conv.add_argument("--force", action="store_true",
                      help="replace an existing OUT file (never IN itself)")
    conv.add_argument("--to", required=True, choices=FORMATS)
    conv.add_argument(
        "--dim", type=_dim, default=KEEP, metavar="DIM",
        help="the axis of g and v in OUT: 'keep' (default: each weight's own, e.g. dim 2 of "
        "Wav2Vec2's positional conv), an axis >= 0 for every weight, 'none' (one norm over "
        "the whole tensor), or KEY=AXIS,... for the weights named only (e.g. 1.weight=0,"
        "2.weight=1: a plain checkpoint's Linear and ConvTranspose for --to wnorm, which "
        "otherwise leaves plain weights plain: a checkpoint does not say which layer is which)",
    )
    conv.add_argument(
        "--key",
        default=None,
        help="convert only checkpoint[KEY] (default: every state dict found, e.g. under "
        "'state_dict', 'model', 'generator'); the other entries are kept, except in a "
        ".safetensors OUT, which holds checkpoint[KEY] alone",
    )
    return parser


def _refuse_same_file(src: Path, dst: Path) -> None:
    """OUT must not be IN under any spelling (``..``, a symbolic or hard link): writing it would
    replace the only copy of the checkpoint."""
    try:
        same = src.exists() and dst.exists() and os.path.samefile(src, dst)
    except OSError:  # cannot stat one of them: load_checkpoint/save_checkpoint will say why
        same = False
    if same:
        raise WnormError(
            f"{dst}: expected an output file other than the input; got the input file {src} "
            "itself; write to a new file (and rename it over the input if you want to replace it)"
        )


def _one_state_dict_for(dst: Path, src: Path, paths: list[tuple[str, ...]]) -> None:
    """A ``.safetensors`` OUT holds one flat state dict: refuse a nested IN without --key."""
    if paths == [()]:
        return
    where = ", ".join("checkpoint" + "".join(f"[{p!r}]" for p in path) for path in paths)
    top = [path[0] for path in paths if len(path) == 1]
    pick = f"pick one with --key {top[0]} (its other entries are not written) or " if top else ""
    raise WnormError(
        f"{dst}: a .safetensors file holds one flat state dict; {src} has its state dicts at "
        f"{where}; {pick}write a .pt file (which keeps every entry)"
    )


_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _convert_folder(args: argparse.Namespace, src: Path, dst: Path) -> int:
    from ._pretrained import convert_folder

    if args.key is not None:
        raise WnormError(f"--key picks an entry of a .pt/.pth checkpoint; {src} is a folder, "
                         "whose weights are converted whole")
    if dst.suffix.lower() in _FILE_SUFFIXES:  # a folder named like a file would surprise everyone
        raise WnormError(f"{dst}: {src} is a folder, converted into a new folder; "
                         f"expected a folder name for OUT, got a {dst.suffix} file name")
    n, notes = convert_folder(src, dst, args.to, args.dim)
    print(f"{args.input} -> {args.output}: {n} weight(s) converted to {args.to} (folder)"
          + "".join(f"; {note}" for note in notes))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ._files import (
        check_input,
        check_output,
        convert_checkpoint,
        find_state_dicts,
        load_checkpoint,
        safetensors_metadata,
        save_checkpoint,
    )

    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        return _convert_folder(args, src, dst)
    check_input(src)  # a missing IN first: what OUT should look like depends on what IN is
    if args.output.endswith(("/", os.sep)):  # Path() drops the slash: it would become a file
        raise WnormError(f"{args.output}: {src} is a file, converted into a file; expected a "
                         f"file name for OUT, got a folder (e.g. {dst / src.name})")
    _refuse_same_file(src, dst)
    check_output(dst)  # before reading a large input: fail fast
    if dst.exists() and not args.force:  # another checkpoint, perhaps the only copy
        raise WnormError(f"{dst}: exists; pass --force to replace it")
    to_st = dst.suffix.lower() == ".safetensors"
    ckpt = load_checkpoint(src)
    try:
        paths = find_state_dicts(ckpt, args.key)
        if isinstance(args.dim, dict) and len(paths) > 1:  # keys are one state dict's names
            where = ", ".join("checkpoint" + "".join(f"[{p!r}]" for p in path)
                              for path in paths)
            raise WnormError(f"--dim KEY=AXIS,... names the weights of one state dict; got "
                             f"several, at {where}: pick the one they belong to with --key")
        out, n = convert_checkpoint(ckpt, args.to, args.key, args.dim)
    except WnormError as e:
        raise WnormError(f"{args.input}: {e}") from None
    if to_st and args.key is None:
        _one_state_dict_for(dst, src, paths)
    notes = []
    if to_st and args.key is not None:
        out = out[args.key]
        if len(ckpt) > 1:
            notes.append(f"only checkpoint[{args.key!r}] written: a .safetensors file holds one "
                         "state dict")
    metadata = safetensors_metadata(src) if src.suffix.lower() == ".safetensors" else None
    if metadata and not to_st:
        notes.append(f"the input's safetensors metadata (keys {sorted(metadata)}) is not "
                     f"written: a {dst.suffix or 'suffix-less'} file has no place for it")
    save_checkpoint(out, dst, metadata=metadata if to_st else None)
    where = ", ".join("checkpoint" + "".join(f"[{p!r}]" for p in path) for path in paths)
    print(f"{args.input} -> {args.output}: {n} weight(s) converted to {args.to} ({where})"
          + "".join(f"; {note}" for note in notes))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``wnorm`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit
    status: 0 on success, 2 for bad input (message on stderr).

    Example:
        >>> main(["convert", "missing.pt", "out.pt", "--to", "plain"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.dim != KEEP and args.to == "plain":
            parser.error("--dim chooses the axis of g and v; --to plain writes w alone")
    except SystemExit as e:  # argparse has printed its usage message
        return e.code if isinstance(e.code, int) else 2
    try:
        with warnings.catch_warnings():  # one line each, like the errors: no source line
            warnings.showwarning = lambda message, *_, **__: print(
                f"wnorm: warning: {message}", file=sys.stderr)
            return _convert(args)
    except WnormError as e:
        print(f"wnorm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
