"""``python -m shufflemamba`` with the faults of ``$SHUFFLEMAMBA_TEST_FAULTS`` installed (tests/faults.py).

Run as a script (``python tests/fault_runner.py train ...``, or under torchrun) by the tests that kill
and resume whole processes.
"""

import os
import sys

from faults import ENV, Faults, install  # this script's folder: tests/

if __name__ == "__main__":
    install(Faults.parse(os.environ.get(ENV, "")))
    from shufflemamba.cli import main

    sys.exit(main())
