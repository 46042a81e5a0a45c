"""`melecole-zoo`: the models shipped with MeLeCoLe (docs/zoo.md).

    melecole-zoo list                       the table: name, data, voxel size, val VI / ARAND, size, licence
    melecole-zoo show NAME                  one model's manifest (and a check of its weights' hash)
    melecole-zoo add --run RUN --name NAME --data fib-gala --config configs/fib-gala-UNet3D.yaml

A zoo model is used by name wherever a checkpoint is taken: infer.py --checkpoint zoo:NAME (also with
--blockwise and --affinities-only), melecole-train --supervised_checkpoint zoo:NAME (fine-tuning),
melecole-export --checkpoint zoo:NAME. `add` reduces a run's checkpoint to its weights, scores it on the
data's val split with the stored config and writes the entry with its manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from melecole.utils.cli import run_cli
from melecole.utils.logger import setup_logging
from melecole.zoo import get_model, list_models, verify_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melecole-zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="list|show|add")
    commands.add_parser("list", help="table of the zoo's models")
    show = commands.add_parser("show", help="one model's manifest")
    show.add_argument("name")
    add = commands.add_parser("add", help="make a zoo entry from a trained run")
    add.add_argument("--run", required=True, help="run folder (checkpoints/last.pt) or checkpoint file")
    add.add_argument("--name", required=True, help="zoo name, e.g. medulla-fibsem")
    add.add_argument("--data", required=True, help="training data: fib-gala, medulla, or a name with the 3 flags below")
    add.add_argument("--data-root", help="folder with <split>/*.hdf to score on (default: ../shared/data/<data>)")
    add.add_argument("--config", required=True, help="config file that trained it (recorded), e.g. configs/X.yaml")
    add.add_argument("--command", dest="train_command", help="training command (default: melecole-train --config X)")
    add.add_argument("--description", help="one line for the manifest")
    add.add_argument("--source", help="where the data comes from (other data)")
    add.add_argument("--licence", help="the data's licence (other data)")
    add.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="nm (other data)")
    add.add_argument("--split", default="val", help="split to score on (default val)")
    add.add_argument("--root", help="zoo folder (default: the package's melecole/zoo/models)")
    add.add_argument("--overwrite", action="store_true", help="replace an existing zoo entry of this name")
    return parser


def print_table(rows: list[dict[str, str]]) -> None:
    """Aligned columns, one header line."""
    if not rows:
        print("no zoo models installed")
        return
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns}
    print("  ".join(column.ljust(widths[column]) for column in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[column]).ljust(widths[column]) for column in columns).rstrip())


def _add(args: argparse.Namespace) -> None:
    from melecole.export.zoo_entry import dataset_info, make_zoo_entry

    data = dataset_info(args.data, source=args.source, licence=args.licence, voxel_size=args.voxel_size)
    data_root = args.data_root or str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / args.data)
    folder = make_zoo_entry(
        args.run, args.name, data, data_root, config=args.config,
        command=args.train_command or f"melecole-train --config {args.config}",
        description=args.description or f"UNet3D embeddings + foreground trained on {args.data} ({args.config})",
        split=args.split, root=args.root, overwrite=args.overwrite,
    )
    print_table([model.row() for model in list_models(folder.parent) if model.name == args.name])
    print(f"written {folder}")


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print_table([model.row() for model in list_models()])
    elif args.command == "show":
        model = get_model(args.name)
        verify_weights(model)
        print(yaml.safe_dump(model.manifest, sort_keys=False).rstrip())
        print(f"# weights {model.weights}: SHA-256 matches the manifest")
    else:
        setup_logging()
        _add(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
