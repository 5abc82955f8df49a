"""The ``wnorm`` command line.

    wnorm convert IN OUT --to {plain,torch-old,torch-new,wnorm} [--key KEY]
    wnorm repro ...            (the paper's experiments: arguments go to ``wnorm.repro``)

Bad input prints ``wnorm: error: <message>`` to stderr and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import WnormError

__all__ = ["main"]


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
        "wnorm's (the old API's names). Reads and writes .pt/.pth and .safetensors.",
    )
    conv.add_argument("input", metavar="IN", help="checkpoint to read")
    conv.add_argument("output", metavar="OUT", help="file to write (.pt, .pth or .safetensors)")
    conv.add_argument("--to", required=True, choices=["plain", "torch-old", "torch-new", "wnorm"])
    conv.add_argument(
        "--key",
        default=None,
        help="convert only checkpoint[KEY] (default: every state dict found, e.g. under "
        "'state_dict', 'model', 'generator'); the other entries are kept, except in a "
        ".safetensors OUT, which holds checkpoint[KEY] alone",
    )
    sub.add_parser(
        "repro",
        add_help=False,
        help="run the paper's experiments (all arguments go to wnorm.repro; try --help)",
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


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import (
        _check_output,
        _safetensors_metadata,
        convert_checkpoint,
        find_state_dicts,
        load_checkpoint,
        save_checkpoint,
    )

    src, dst = Path(args.input), Path(args.output)
    _refuse_same_file(src, dst)
    _check_output(dst)  # before reading a large input: fail fast
    to_st = dst.suffix == ".safetensors"
    ckpt = load_checkpoint(src)
    try:
        paths = find_state_dicts(ckpt, args.key)
        out, n = convert_checkpoint(ckpt, args.to, args.key)
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
    metadata = _safetensors_metadata(src) if src.suffix == ".safetensors" else None
    if metadata and not to_st:
        notes.append(f"the input's safetensors metadata (keys {sorted(metadata)}) is not "
                     f"written: a {dst.suffix or 'suffix-less'} file has no place for it")
    save_checkpoint(out, dst, metadata=metadata if to_st else None)
    where = ", ".join("checkpoint" + "".join(f"[{p!r}]" for p in path) for path in paths)
    print(f"{args.input} -> {args.output}: {n} weight(s) converted to {args.to} ({where})"
          + "".join(f"; {note}" for note in notes))
    return 0


def _repro(argv: list[str]) -> int:
    try:
        from .repro.__main__ import main as repro_main
    except ModuleNotFoundError as e:
        if e.name and (e.name == "wnorm.repro" or e.name.startswith("wnorm.repro.")):
            print(
                "wnorm: error: the repro command needs wnorm.repro (the paper's experiments), "
                "which this installation does not have",
                file=sys.stderr,
            )
        else:  # wnorm.repro is there, one of its optional dependencies is not
            print(
                f"wnorm: error: the repro command needs the package '{e.name}'; "
                "pip install 'wnorm[repro]'",
                file=sys.stderr,
            )
        return 2
    try:
        code = repro_main(argv)
    except SystemExit as e:  # its argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``wnorm`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit
    status: 0 on success, 2 for bad input (message on stderr).

    Example:
        >>> main(["convert", "missing.pt", "out.pt", "--to", "plain"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["repro"]:  # everything after it belongs to wnorm.repro, options too
            return _repro(argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # argparse has printed its usage message
            return e.code if isinstance(e.code, int) else 2
        return _convert(args)
    except WnormError as e:
        print(f"wnorm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
