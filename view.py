"""View a segmentation next to raw and ground truth: neuroglancer (interactive) or a PNG montage.

    python -i view.py --gt dataset/val/AC3_val.hdf --segmentation results/.../val_segmentation.hdf
    python view.py --gt GT.hdf --segmentation SEG.hdf --png report.png --slices 10 50 90

The command line is melecole/cli/view.py (also installed as `melecole-view`). Under
``python -i`` the viewer keeps serving and ``viewer`` is the neuroglancer.Viewer.
"""

import sys

from melecole.cli import view as view_cli
from melecole.cli.view import main

viewer = None

if __name__ == "__main__":
    exit_code = main(None)
    viewer = view_cli.viewer
    if exit_code or not sys.flags.interactive:
        sys.exit(exit_code)
