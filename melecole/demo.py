"""``make demo``: the whole pipeline on one config: data -> train -> infer the val split -> evaluate -> one table.

    python -m melecole.demo --config configs/synthetic-UNet3D.yaml      # what `make demo` runs
    python -m melecole.demo --config CONFIG --checkpoint RUN/checkpoints/last.pt   # skip training

The command line is :mod:`melecole.cli.demo` (``--help`` says more).
"""

from melecole.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
