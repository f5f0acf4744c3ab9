"""``python -m shufflemamba.bench``: the benchmark suite, as ``shufflemamba bench``."""

import sys

from ..console import guarded
from .suite import main

if __name__ == "__main__":
    sys.exit(guarded(main, sys.argv[1:]))
