"""`variation_of_information.py` / `melecole-evaluate`: scores a segmentation against ground truth.

VI split/merge (bits), adapted Rand error, offenders:

    python variation_of_information.py --gt dataset/val/AC3_val.hdf \
        --segmentation results/last/val_segmentation.hdf --membranes results/last/val_membranes.hdf

With --membranes, the connected components of the foreground probability (> --threshold) are
scored as a baseline; segmentation and membranes must come from one infer.py run (their
fingerprints must agree). A volume larger than the ground truth (or smaller) by the same number of
voxels on both sides of each axis, e.g. padded raw context, is center-cropped to fit (as view.py
does). A cell-size histogram is written beside the segmentation file (a warning if it cannot be).
"""

from __future__ import annotations

import argparse
import math
import sys

from melecole.errors import ConfigError
from melecole.evaluation.report import evaluate_files, format_report, write_json
from melecole.utils.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="variation_of_information.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gt", required=True, help="HDF5 file with ground-truth labels (0 = boundary)")
    parser.add_argument("--segmentation", required=True, help="HDF5 file with the predicted labels")
    parser.add_argument("--membranes", help="HDF5 file with the foreground probability (CC baseline)")
    parser.add_argument("--gt-key", help="dataset in --gt (default: labels)")
    parser.add_argument(
        "--segmentation-key",
        help="dataset in --segmentation (default: segmentation, or the file's only dataset)",
    )
    parser.add_argument(
        "--membranes-key", help="dataset in --membranes (default: membranes, or the file's only dataset)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground threshold of the baseline")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    parser.add_argument("--nats", action="store_true", help="natural log instead of bits")
    parser.add_argument(
        "--compat-original",
        action="store_true",
        help="original MeLeCoLe numbers: natural log, voxels 0 in either volume ignored",
    )
    parser.add_argument("--top", type=int, default=10, help="merge/split offenders to list")
    parser.add_argument("--histogram", help="cell-size PNG (default: <segmentation stem>_cell_sizes.png)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """One-line errors for values argparse accepts but the evaluation cannot use."""
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold: {args.threshold:g}, expected a foreground probability in [0, 1]")
    if args.top < 0:
        raise ConfigError(f"--top: {args.top}, expected a number of offenders >= 0")


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    report = evaluate_files(
        args.gt,
        args.segmentation,
        membranes_path=args.membranes,
        gt_key=args.gt_key,
        segmentation_key=args.segmentation_key,
        membranes_key=args.membranes_key,
        threshold=args.threshold,
        log_base=math.e if args.nats else 2.0,
        compat_original=args.compat_original,
        top_k=args.top,
        histogram_path=args.histogram,
    )
    print(format_report(report), flush=True)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        write_json(report, args.json)
        print(f"json: {args.json}")
    return 0

