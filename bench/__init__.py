"""wnorm's benchmark suite: interleaved timings of plain vs weight-normalized models, as ratios.

Run from the repository root::

    python -m bench.run [--quick] [--out results/bench]      # bench.json + bench.md
    python -m bench.run --profile mlp.train.adam.b1          # profiler table, plain vs wnorm
    python -m bench.report results/bench/bench.json           # re-render bench.md

- :mod:`bench.harness`  interleaved timing (A B C A B C ...), medians, the environment record
- :mod:`bench.cases`    the models (the paper's CIFAR convnet, an MLP), variants and cases
- :mod:`bench.run`      the command line
- :mod:`bench.report`   bench.json -> bench.md

Not part of the library: ``import wnorm`` never imports this package.
"""
