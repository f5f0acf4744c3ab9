"""``python -m shufflemamba``: the same command as the ``shufflemamba`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
