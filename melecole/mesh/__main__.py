"""``python -m melecole.mesh SEG --output DIR``: a neuroglancer precomputed segmentation with meshes.

The same as the ``melecole-mesh`` console script; the command line is :mod:`melecole.cli.mesh`
(``--help`` lists its options).
"""

from melecole.cli import exit_script
from melecole.cli.mesh import main

if __name__ == "__main__":
    exit_script(main())
