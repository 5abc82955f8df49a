"""``python -m wnorm``: the ``wnorm`` command (:mod:`wnorm.cli`), where the console script is
not on the PATH."""

from .cli import main

raise SystemExit(main())
