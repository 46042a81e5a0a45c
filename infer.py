"""Sliding-window inference and mutex watershed for a checkpoint.

    python infer.py --split val --config configs/X.yaml --checkpoint RUN/checkpoints/last.pt
    python infer.py --input vol.hdf --raw-key raw --config X.yaml --checkpoint RUN --thresholds 0.3 0.7

Writes <run dir>/results/<checkpoint stem>/<prefix>_{affinities,membranes,segmentation}.hdf
(prefix = split, <split>_<volume stem> for several volumes, or the --input stem). Affinities and
foreground are reused when their fingerprint (checkpoint, config, input) matches; MWS is redone.
"""

from __future__ import annotations

import argparse

from melecole.config import load_cfg
from melecole.inference.pipeline import run_inference
from melecole.utils.cli import add_config_arguments, run_cli
from melecole.utils.logger import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="infer every volume in <DATASET.DATA_ROOT>/<split>/")
    parser.add_argument("--input", help="one HDF5 volume instead (--split then only names the outputs)")
    parser.add_argument("--raw-key", help="raw dataset in --input (default: DATASET.RAW_KEY)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (checkpoints/last.pt)")
    parser.add_argument("--output-dir", help="run folder for results/<checkpoint stem>/ (default: the checkpoint's)")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[],
        help="extra foreground thresholds, each one more dataset segmentation_tX.XX "
        "(INFERENCE.MWS_BACKGROUND gives 'segmentation')",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute even if cached results match")
    parser.add_argument("--no-eval", action="store_true", help="skip the VI/ARAND summary for labelled volumes")
    add_config_arguments(parser)
    return parser


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split is None and args.input is None:
        parser.error("give --split or --input")
    setup_logging()
    cfg = load_cfg(args.config, args.opts)
    results = run_inference(
        cfg,
        args.checkpoint,
        split=args.split,
        input_path=args.input,
        raw_key=args.raw_key,
        output_dir=args.output_dir,
        thresholds=args.thresholds,
        overwrite=args.overwrite,
        evaluate=not args.no_eval,
        progress=cfg.LOG.PROGRESS_BAR,
    )
    for result in results:
        state = "reused cached affinities" if result.reused else "computed"
        print(f"{result.name}: {state}")
        for path in (result.affinities, result.membranes, result.segmentation):
            print(f"  {path}")
        for key, score in result.scores.items():
            print(f"  {key}: VI split {score['vi_split']:.4f} merge {score['vi_merge']:.4f} ARAND {score['arand']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
