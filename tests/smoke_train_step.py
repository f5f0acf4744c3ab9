"""Install smoke check: import shufflemamba and train a tiny model for one epoch through the CLI.

Run it with the interpreter of an environment that already has its own torch, torchvision and timm,
after ``pip install --no-deps -e .`` there (``make check-install PY=/path/to/venv/bin/python``)::

    python tests/smoke_train_step.py

It writes a few generated images to a temporary folder (no network, no data set needed), runs
``shufflemamba train`` for one epoch of a 2-block Vim on them, and prints one line with the
versions it ran on. Exit code 0 on success. Not collected by pytest (tests/test_install.py runs it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main() -> int:
    import numpy as np
    from PIL import Image

    import shufflemamba  # the torchvision shim runs here, before timm
    from shufflemamba import _compat
    from shufflemamba.cli import main as cli

    import timm
    import torch
    import torchvision

    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for split, n in (("train", 8), ("val", 4)):
            for c in range(2):
                d = os.path.join(root, "data", split, f"c{c}")
                os.makedirs(d)
                for i in range(n):
                    a = (rng.random((16, 16, 3)) * 100 + 100 * c).astype(np.uint8)
                    Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
        out = os.path.join(root, "run")
        rc = cli(["train", "--data-dir", os.path.join(root, "data"), "--model", "vim_tiny_patch16_224",
                  "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=2", "d_state=4",
                  "--img-size", "16", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                  "--device", "cpu", "--lr", "1e-3", "--scale-lr", "false", "--warmup-epochs", "0",
                  "--slws-rate", "0.5", "--output", out])
        if rc != 0:
            print(f"smoke: shufflemamba train exited {rc}", file=sys.stderr)
            return 1
        with open(os.path.join(out, "metrics.jsonl")) as f:
            row = json.loads(f.readline())
    print(f"smoke ok: shufflemamba {shufflemamba.__version__} trained 1 epoch (train_loss {row['train_loss']:.3f}) "
          f"on torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
          f"python {sys.version.split()[0]}; torchvision shim applied: {_compat.applied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
