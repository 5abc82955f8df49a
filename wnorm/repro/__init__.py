"""The paper's experiments, reproduced: ``python -m wnorm.repro --help``.

Not imported by ``import wnorm``; needs the ``repro`` extra (numpy, matplotlib, tqdm).

- :mod:`wnorm.repro.datasets`  Fashion-MNIST (IDX) and CIFAR-10 (python batches), ZCA whitening
- :mod:`wnorm.repro.models`    the CIFAR-10 network of section 5, in five normalizer variants
- :mod:`wnorm.repro.train`     one training run -> one run folder (config, version, metrics, log)
- :mod:`wnorm.repro.report`    run folders -> ``training_error.png`` + ``report.md``
- :mod:`wnorm.repro.__main__`  the command line: ``classify``, ``report``, ``demo``
"""
