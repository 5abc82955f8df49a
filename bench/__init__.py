"""wnorm's benchmark suite: interleaved timings of plain vs weight-normalized models, as ratios.

Run from the repository root::

    python -m bench.run [--quick] [--out runs/bench/cpu]     # bench.json + bench.md
    python -m bench.run --profile mlp4x256.train.sgd.b1      # profiler table, plain vs wnorm
    python -m bench.report results/bench/cpu/bench.json      # re-render its bench.md
    python -m bench.report --summary results/bench           # results/bench/bench.md

- :mod:`bench.harness`  interleaved timing (A B C A B C ...), medians, the environment record
- :mod:`bench.cases`    the models (the paper's CIFAR convnet, an MLP), variants and cases
- :mod:`bench.run`      the command line
- :mod:`bench.report`   bench.json -> bench.md

Not part of the library: ``import wnorm`` never imports this package.
"""
