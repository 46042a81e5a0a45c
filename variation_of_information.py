"""Scores a segmentation against ground truth: VI split/merge (bits), adapted Rand error, offenders.

    python variation_of_information.py --gt dataset/val/AC3_val.hdf --segmentation SEG.hdf [--membranes MEM.hdf]

The command line is melecole/cli/evaluate.py (also installed as `melecole-evaluate`).
"""

from melecole.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
