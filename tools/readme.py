"""Regenerate the generated sections of README.md and docs/experiments.md from committed files.

    python tools/readme.py           # rewrite them in place
    python tools/readme.py --check   # exit 1 if one is out of date (the tests run this)

Each section sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``
and is copied from the file a command wrote (the lead text says which command): a figure is
never typed by hand. Headings are demoted to fit under the page's own, and relative links are
rewritten from the source file's folder to the page's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/experiments.md")

# name: (source, lead text with the command that wrote the source, heading levels to add)
SECTIONS: dict[str, tuple[str, str, int]] = {
    "demo": (
        "results/demo/report/report.md",
        "`make demo` (`python -m experiments.demo`, writing `runs/demo`; this committed run: "
        "`python -m experiments.demo --out results/demo`): the paper's five "
        "variants x 3 seeds, its network at 1/8 width, 2,000 Fashion-MNIST images, 6 epochs, "
        "on the CPU; its wall and CPU time and the machine's load are in "
        "`results/demo/demo.json`.",
        2,
    ),
    "classify": (
        "results/classify-fashion-cpu/report/report.md",
        "Five variants x 3 seeds on a 20,000-example Fashion-MNIST subset, the paper's network "
        "at 1/8 width, 15 epochs, the paper's optimizer and schedule, on the CPU:\n\n"
        "    python -m experiments.classify --dataset fashion-mnist "
        "--variants normal,weightnorm,batchnorm,wn+meanonly,meanonly --seeds 0,1,2 --epochs 15 "
        "--width 0.125 --train-subset 20000 --threads 1 --out results/classify-fashion-cpu\n"
        "    python -m experiments.report results/classify-fashion-cpu "
        "--out results/classify-fashion-cpu/report",
        1,
    ),
    "family": (
        "results/family-demo/report.md",
        "Weight normalization's relatives as variants of the same harness, one seed, "
        "demo-sized; the command is in the report's header.",
        1,
    ),
    "graph": (
        "results/graph/report.md",
        "Graph networks (torch_geometric): normal vs weight norm, with and without data init; "
        "the command is in the report's header.",
        1,
    ),
    "lr-sweep": (
        "results/lr-sweep/report.md",
        "The learning-rate robustness claim (Salimans & Kingma 2016, section 2.1) and the "
        "growth of ||v||; the command is in the report's header.",
        1,
    ),
    "norm-growth": (
        "results/norm_growth/summary.md",
        "The effective learning rate: ||v|| grows under weight norm and stays put under "
        "`wnorm.project_after_step`; made by `python -m experiments.norm_growth`.",
        1,
    ),
    "others": (
        "results/others-report/report.md",
        "The paper's other experiments (convolutional VAE, LSTM, deep Q-learning), normal vs "
        "weight norm; the commands are in the report.",
        1,
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
}

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)#:\s]+)(\))")


def _rewrite(text: str, source: Path, page: Path, demote: int) -> str:
    def link(m: re.Match[str]) -> str:
        target = m.group(2)
        if target.startswith(("http", "/", "#")):
            return m.group(0)
        found = source.parent / target
        if not found.exists() and (ROOT / target).exists():
            found = ROOT / target  # a link already relative to the repository root
        return f"{m.group(1)}{Path(os.path.relpath(found, page.parent)).as_posix()}{m.group(3)}"

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


def render(name: str, page: Path) -> str:
    source, lead, demote = SECTIONS[name]
    path = ROOT / source
    if not path.exists():
        body = f"Not generated yet: `{source}` is missing (see the command above).\n"
    else:
        body = _rewrite(path.read_text(), path, page, demote)
    lead = f"{lead}\n\n" if lead else ""
    return f"{lead}{body}"


def update(text: str, page: Path) -> str:
    for name in SECTIONS:
        begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
        if begin not in text:
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        src = SECTIONS[name][0]
        text = (f"{head}{begin}\n<!-- from {src} by tools/readme.py: edit the source -->\n"
                f"{render(name, page)}{end}{tail}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
    args = parser.parse_args(argv)
    stale = []
    for name in PAGES:
        path = ROOT / name
        old = path.read_text()
        new = update(old, path)
        if new != old:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)} out of date: run `python tools/readme.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
