"""``python -m melecole.blockwise``: segment stored affinities block by block on dask (large volumes).

    python -m melecole.blockwise --affinities aff.zarr --output seg.zarr --config configs/X.yaml

The same as the ``melecole-blockwise`` console script; the command line is :mod:`melecole.cli.blockwise`
(``--help`` lists its options).
"""

from melecole.cli import exit_script
from melecole.cli.blockwise import main

if __name__ == "__main__":
    exit_script(main())
