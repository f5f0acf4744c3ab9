"""``python -m shufflemamba.bench``: the benchmark suite, as ``shufflemamba bench``."""

import sys

from ..console import guarded
from ..process import tune_malloc
from .suite import main

if __name__ == "__main__":
    tune_malloc()  # as `shufflemamba bench` runs (cli.main): the same figures from either
    sys.exit(guarded(main, sys.argv[1:]))
