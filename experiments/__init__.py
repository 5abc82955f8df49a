"""The paper's experiments, beside the library (not part of the wheel): one script each.

Run them from the repository root, e.g. ``python -m experiments.demo``; each script's
docstring gives its exact commands, and its defaults sit in one block at its top.

- :mod:`experiments.demo`          the quick comparison ``make demo`` runs (2 CPU cores)
- :mod:`experiments.classify`      the classification experiment (section 5), any device
- :mod:`experiments.classify_gpu`  the same at full scale on one GPU, fast; ``--timing``
- :mod:`experiments.lr_sweep`      learning-rate robustness and the growth of ||v||
- :mod:`experiments.norm_growth`   ||v|| under weight norm and under projection on the sphere
- :mod:`experiments.graph`         graph networks (torch_geometric) on a kNN graph of images
- :mod:`experiments.vae`, :mod:`experiments.seq`, :mod:`experiments.dqn`  section 6
- :mod:`experiments.report`        run folders -> tables and plots (any of the above)

Shared: :mod:`experiments.common` (run folders and options), :mod:`experiments.data`
(datasets), :mod:`experiments.nets` (the networks and variants), :mod:`experiments.seed_stack`
(several seeds as one network), :mod:`experiments.stack_trainer` (training such a stack
without waiting for the device), :mod:`experiments.gpu_plan` and :mod:`experiments.gpu_timing`
(classify_gpu's plan and timing mode), :mod:`experiments.report_sweep` and
:mod:`experiments.report_others` (the reports of the sweep and of section 6).
"""
