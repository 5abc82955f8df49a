"""Regenerate the README's generated sections from committed files; never type a figure by hand.

    python tools/readme.py           # rewrite README.md in place
    python tools/readme.py --check   # exit 1 if README.md is out of date (the tests run this)

Each section sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``
and is copied from the file a command wrote (the section says which command). Headings are
demoted to fit under the README's own, and relative links are rewritten from the source file's
folder to the repository root.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (source, lead text with the command that wrote the source, heading levels to add)
SECTIONS: dict[str, tuple[str, str, int]] = {
    "repro": (
        "results/classify-fashion-cpu/report/report.md",
        "The committed CPU run (no GPU was lent to this work): five variants x 3 seeds on a "
        "20,000-example Fashion-MNIST subset, the paper's network at 1/8 width, 15 epochs, the "
        "paper's optimizer and schedule (Adam, lr 0.001, beta1 0.9 then 0.5), one run per CPU core "
        "(the time it took is in the report's header). Made by the command below, its runs split "
        "over processes (each run folder's `version.json` records its own command line):\n\n"
        "    python -m wnorm.repro classify --dataset fashion-mnist "
        "--variants normal,weightnorm,batchnorm,wn+meanonly,meanonly --seeds 0,1,2 --epochs 15 "
        "--width 0.125 --train-subset 20000 --threads 1 --out results/classify-fashion-cpu\n"
        "    python -m wnorm.repro report results/classify-fashion-cpu "
        "--out results/classify-fashion-cpu/report\n\n"
        "The full-size run for a GPU (all 60,000 examples, full width, 3 seeds, 100 epochs) is "
        "`python -m wnorm.repro classify --dataset fashion-mnist --variants "
        "normal,weightnorm,batchnorm,wn+meanonly,meanonly --seeds 0,1,2 --epochs 100 --device cuda "
        "--out runs/fashion-full` (not run here).\n\n"
        "The seconds-per-epoch column below is wall time on a shared machine whose load changed "
        "during the runs (other jobs ran beside them), so it says little about cost: the "
        "Performance section measures that, interleaved.",
        2,
    ),
    "family": (
        "results/family-demo/report.md",
        "Weight normalization's relatives (`wnorm.centered_weight_norm`, "
        "`wnorm.weight_standardization`, `wnorm.forced_weight_norm`, `wnorm.arpit_init`) as "
        "variants of the same harness, one seed, demo-sized; the command is in the table's "
        "header. Forced WN holds each row of v at norm sqrt(fan-in) (EDM2's choice), far above "
        "the paper's N(0, 0.05^2) start, so at the same Adam learning rate its relative steps on "
        "v are much smaller than weight norm's: the sweep below shows its good learning rates "
        "sit higher. Its row here is under-trained at this learning rate rather than broken. "
        "`forced_weight_norm(layer, radius=r)` holds v at another norm (these runs use the "
        "default): a smaller radius takes larger relative steps at the same learning rate.",
        2,
    ),
    "lr-sweep": (
        "results/lr-sweep/report.md",
        "The learning-rate robustness claim (PAPER.md section 2) and the growth of ||v||; the "
        "command is in the report's header.",
        2,
    ),
    "others": (
        "results/others-report/report.md",
        "The paper's other experiments (convolutional VAE, LSTM, deep Q-learning), normal vs "
        "weight norm; the commands are in the report.",
        2,
    ),
    "bench": (
        "results/bench/bench.md",
        "Cost of each variant as a ratio to the same plain model trained with the same "
        "optimizer, medians of interleaved repeats, one run per device, beside issue 16's "
        "targets. Made by `python -m bench.run --out results/bench/cpu` (CPU rows, 1 thread) "
        "and `bash bench/gpu.sh OUT` on a CUDA machine (its `OUT/cuda/bench.json` copied to "
        "`results/bench/cuda/`), then `python -m bench.report --summary results/bench`; "
        "`python -m bench.run --profile CASE` prints where one row's time goes.",
        2,
    ),
    "how": ("docs/how_it_works.md", "", 0),
    "guarantees": ("docs/guarantees.md", "", 1),
}

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)#:\s]+)(\))")


def _rewrite(text: str, source: Path, demote: int) -> str:
    folder = source.parent.relative_to(ROOT)

    def link(m: re.Match[str]) -> str:
        target = m.group(2)
        if target.startswith(("http", "/", "#")) or (ROOT / target).exists():
            return m.group(0)
        return f"{m.group(1)}{(folder / target).as_posix()}{m.group(3)}"

    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence:
            if demote and line.startswith("#"):
                line = "#" * demote + line
            line = _LINK.sub(link, line)
        out.append(line)
    return "\n".join(out).strip() + "\n"


def render(name: str) -> str:
    source, lead, demote = SECTIONS[name]
    path = ROOT / source
    if not path.exists():
        body = f"Not generated yet: `{source}` is missing (see the command below).\n"
    else:
        body = _rewrite(path.read_text(), path, demote)
    lead = f"{lead}\n\n" if lead else ""
    return f"{lead}{body}"


def update(readme: str) -> str:
    for name in SECTIONS:
        begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
        if begin not in readme:
            continue
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        src = SECTIONS[name][0]
        readme = f"{head}{begin}\n<!-- from {src} by tools/readme.py: edit the source -->\n{render(name)}{end}{tail}"
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    new = update(old)
    if args.check:
        if new != old:
            print("README.md is out of date: run `python tools/readme.py`", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
