"""`melecole-export`: a checkpoint as TorchScript, ONNX or a bioimage.io package (docs/zoo.md).

    melecole-export --checkpoint RUN/checkpoints/last.pt --format onnx --output model-onnx/
    melecole-export --checkpoint zoo:fib-gala-fibsem --format bioimageio --output fib-gala-bioimageio/

Writes the folder --output (refused if it exists, unless --overwrite and it is an earlier export's),
checks the exported model against PyTorch on a test window (affinities within 1e-4) and, for bioimageio,
validates the package with bioimageio.spec and tests it with bioimageio.core.
"""

from __future__ import annotations

import argparse

from melecole.errors import ConfigError
from melecole.export.package import EXPORT_FORMATS, export_checkpoint
from melecole.utils.cli import run_cli
from melecole.utils.logger import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melecole-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint file, run folder (checkpoints/last.pt) or zoo:NAME")
    add("--format", required=True, metavar="|".join(EXPORT_FORMATS), help="what to write")
    add("--output", required=True, help="output folder (new, or an earlier export with --overwrite)")
    add("--overwrite", action="store_true", help="replace an earlier melecole-export output")
    add("--window", type=int, nargs=3, metavar=("Z", "Y", "X"), help="input window (default: the inference window)")
    return parser


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {args.format!r} is not a known export format, expected one of: "
                          f"{', '.join(EXPORT_FORMATS)}")
    setup_logging()
    summary = export_checkpoint(args.checkpoint, args.format, args.output, overwrite=args.overwrite,
                                window=args.window)
    print(f"{summary.format} export of window {list(summary.window)} in {summary.output}:")
    for name in summary.files:
        print(f"  {name}")
    for key, value in summary.checks.items():
        print(f"  {key}: {value:.3g}")
    if summary.report:
        print("  bioimageio.core test_model: passed (report: bioimageio_test.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
