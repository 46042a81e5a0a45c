"""`infer.py` / `melecole-infer`: sliding-window inference and mutex watershed for a checkpoint.

    python infer.py --split val --config configs/X.yaml --checkpoint RUN/checkpoints/last.pt
    python infer.py --input vol.hdf --raw-key raw --config X.yaml --checkpoint RUN --thresholds 0.3 0.7

Writes <run dir>/results/<checkpoint stem>/<prefix>_{affinities,membranes,segmentation}.hdf
(prefix = split, <split>_<volume stem> for several volumes, or the --input name). --input also takes
file.hdf:key, zarr (x.zarr[:key]) and precomputed URLs. Affinities and foreground are reused when
their fingerprint (checkpoint, config, input) matches; MWS is redone. --output-precomputed URL also
writes URL/segmentation and URL/affinities. --affinities-only predicts block by block (bounded
memory) from --input into --output-affinities (precomputed or zarr), without MWS or HDF5 results.
--blockwise predicts the same way (--chunk, --halo) and segments block by block into --output (zarr), both
as block tasks of one dask run; it takes the options of python -m melecole.blockwise (--block,
--workers | --scheduler, --fragments, --resume).
"""

from __future__ import annotations

import argparse

from melecole.blockwise.orchestrate import infer_blockwise
from melecole.cli.blockwise import add_blockwise_arguments, blockwise_keywords
from melecole.config import load_cfg
from melecole.errors import ConfigError
from melecole.inference.chunked import predict_affinities_to_store
from melecole.inference.options import build_predict_options
from melecole.inference.pipeline import run_inference
from melecole.inference.stores import check_store_url, export_results
from melecole.utils.cli import add_config_arguments, run_cli
from melecole.utils.logger import setup_logging

ZYX = ("Z", "Y", "X")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--split", help="infer every volume in <DATASET.DATA_ROOT>/<split>/")
    add("--input", help="one volume instead: file.hdf[:key], x.zarr[:key], precomputed://... (--split names outputs)")
    add("--raw-key", help="raw dataset / zarr array if --input names none (default: DATASET.RAW_KEY)")
    add("--checkpoint", required=True, help="checkpoint file, or a run folder (checkpoints/last.pt)")
    add("--output-dir", help="run folder for results/<checkpoint stem>/ (default: the checkpoint's)")
    add("--thresholds", type=float, nargs="+", default=[], help="extra MWS foreground thresholds (segmentation_tX.XX)")
    add("--overwrite", action="store_true", help="recompute even if cached results match; replace outputs")
    add("--no-eval", action="store_true", help="skip the VI/ARAND summary for labelled volumes")
    add("--output-precomputed", metavar="URL", help="also write URL/segmentation, URL/affinities (precomputed/zarr)")
    add("--resolution", type=float, nargs=3, metavar=ZYX, help="output voxel size, nm (default: the input's, or 1)")
    add("--output-dtype", choices=("float32", "uint8"), default="float32", help="dtype of affinity outputs")
    add("--affinities-only", action="store_true", help="chunk-by-chunk affinities only: no MWS, no HDF5")
    add("--output-affinities", metavar="URL", help="--affinities-only output (C, Z, Y, X): precomputed or zarr")
    add("--output-membranes", metavar="URL", help="--affinities-only foreground probability output")
    add("--chunk", type=int, nargs=3, metavar=ZYX, help="--affinities-only / --blockwise block (default 32 256 256)")
    add("--halo", type=int, nargs=3, metavar=ZYX, help="--affinities-only / --blockwise context (default: exact)")
    add("--blockwise", action="store_true", help="chunked affinities, then blockwise segmentation (dask)")
    add("--output", metavar="URL", help="--blockwise segmentation output (zarr: x.zarr[:key])")
    add_blockwise_arguments(parser, overwrite=False)
    add_config_arguments(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """One-line errors for flag combinations argparse cannot express."""
    chunked = ("--output-affinities", "--output-membranes", "--chunk", "--halo")
    whole = ("--split", "--output-precomputed", "--thresholds", "--output-dir", "--no-eval")
    given = [flag for flag in chunked + whole if getattr(args, flag[2:].replace("-", "_"))]
    if args.blockwise:
        wrong = " ".join(flag for flag in given if flag not in ("--chunk", "--halo"))
        if wrong or args.affinities_only:
            raise ConfigError(f"--blockwise writes --output only; drop {wrong or '--affinities-only'}")
        return
    wrong = " ".join(flag for flag in given if flag in (whole if args.affinities_only else chunked))
    if wrong and args.affinities_only:
        raise ConfigError(f"--affinities-only writes --output-affinities/--output-membranes only; drop {wrong}")
    if wrong:
        raise ConfigError(f"{wrong}: only with --affinities-only")
    if not args.affinities_only and args.split is None and args.input is None:
        raise ConfigError("give --split or --input")
    if args.output_precomputed:
        check_store_url(args.output_precomputed, "--output-precomputed", prefix=True)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    setup_logging()
    cfg = load_cfg(args.config, args.opts)
    if args.blockwise:
        if not args.input or not args.output:
            raise ConfigError("--blockwise needs --input URL (raw) and --output URL (zarr segmentation)")
        infer_blockwise(cfg, args.checkpoint, args.input, args.output, raw_key=args.raw_key, chunk=args.chunk,
                        halo=args.halo, **blockwise_keywords(args))
        return 0
    common = dict(raw_key=args.raw_key, overwrite=args.overwrite, progress=cfg.LOG.PROGRESS_BAR)
    store = dict(resolution=args.resolution, output_dtype=args.output_dtype)
    if args.affinities_only:
        outputs = dict(membranes_url=args.output_membranes, chunk_shape=args.chunk, halo=args.halo)
        common["raw_key"] = args.raw_key or cfg.DATASET.RAW_KEY
        options = build_predict_options(cfg)
        summary = predict_affinities_to_store(
            options, args.checkpoint, args.input, args.output_affinities, cfg=cfg, **outputs, **common, **store
        )
        print(f"affinities {summary.shape} in {summary.chunks} blocks ({summary.seconds:.1f} s)")
        for url in filter(None, (summary.affinities_url, summary.foreground_url)):
            print(f"  {url}")
        return 0
    whole = dict(split=args.split, input_path=args.input, output_dir=args.output_dir, thresholds=args.thresholds)
    results = run_inference(cfg, args.checkpoint, evaluate=not args.no_eval, **whole, **common)
    exported = export_results(results, args.output_precomputed, **store) if args.output_precomputed else {}
    for result in results:
        print(f"{result.name}: {'reused cached affinities' if result.reused else 'computed'}")
        for path in (result.affinities, result.membranes, result.segmentation, *exported.get(result.name, [])):
            print(f"  {path}")
        for key, score in result.scores.items():
            print(f"  {key}: VI split {score['vi_split']:.4f} merge {score['vi_merge']:.4f} ARAND {score['arand']:.4f}")
    return 0
