"""`view.py` / `melecole-view`: a segmentation next to raw and ground truth in neuroglancer or a PNG.

    python -i view.py --gt dataset/val/AC3_val.hdf --segmentation results/.../val_segmentation.hdf
    python view.py --gt GT.hdf --segmentation SEG.hdf --png report.png --slices 10 50 90
    python view.py --gt GT.hdf --segmentation MESHES       # a layer of python -m melecole.mesh: meshes in 3D

Inputs are HDF5 (``file.hdf`` or ``file.hdf:key``), zarr or precomputed URLs. Under ``python -i``
the viewer keeps serving and ``viewer`` is the neuroglancer.Viewer; without -i the script serves
until Ctrl-C.

Padding: raw is cropped to the labels (--padding, inferred from the shapes if omitted). A
segmentation, GT, membranes or affinities volume larger than the others by the same number of
voxels on both sides of each axis is center-cropped to fit, as variation_of_information.py does.
Segmentation, affinities and membranes must come from one infer.py run (their fingerprints agree).

Meshes: a --segmentation written by ``python -m melecole.mesh`` (a precomputed layer folder with meshes) is
served from its folder, voxels and meshes, with its largest segments selected (their meshes show in the
3D panel); its voxel size is the view's unless --resolution says otherwise (then an error: they must agree).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from melecole.errors import DataError
from melecole.io import check_same_fingerprint, check_writable_folder
from melecole.io.meshes import MeshLayer, mesh_labels, read_mesh_layer
from melecole.utils.cli import run_cli
from melecole.visualization import build_viewer_state, open_view_inputs, render_report, start_viewer
from melecole.visualization.viewer import DEFAULT_RESOLUTION, check_dimensions, check_server_address, serve_folder

viewer = None  # the neuroglancer.Viewer once started (view.py exposes it under `python -i`)
mesh_server = None  # the file server of a segmentation with meshes (kept referenced while the viewer runs)
# Segments selected at first in a segmentation with meshes: the largest meshes (bytes of their fragments).
SELECTED_MESHES = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="view.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gt", required=True, help="ground truth (HDF5 key 'labels' by default)")
    parser.add_argument("--segmentation", required=True, help="segmentation (key 'segmentation')")
    parser.add_argument("--raw", help="raw (key 'volume'); default: the GT file's 'volume' if present")
    parser.add_argument("--affinities", help="affinities (C, Z, Y, X) (key 'affinities')")
    parser.add_argument("--membranes", help="membrane / foreground map (key 'membranes')")
    parser.add_argument(
        "--padding",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="raw context per side, cropped away (default: inferred from the shapes)",
    )
    parser.add_argument(
        "--resolution",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="voxel size in nm (default: a mesh layer's own, else 30 6 6, SNEMI3D)",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address the viewer listens on")
    parser.add_argument("--port", type=int, default=0, help="viewer port (0 = a free port)")
    parser.add_argument("--png", help="write a PNG montage here instead of starting a viewer")
    parser.add_argument(
        "--slices", type=int, nargs="+", help="z slices of the montage (default: 4 evenly spaced)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="merge / split offenders marked in the montage")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """One-line errors before any volume is read: the PNG path or the server address, and result
    files of different inference runs."""
    if args.png:
        png = Path(args.png)
        if png.is_dir():
            raise DataError(f"--png: '{png}' is a folder, expected the path of a .png file to write")
        check_writable_folder(png.parent, f"--png '{png}'")
    else:
        check_server_address(args.bind, args.port)
    check_same_fingerprint(
        {"--segmentation": args.segmentation, "--affinities": args.affinities, "--membranes": args.membranes}
    )


def view_resolution(given: list[float] | None, layer: MeshLayer | None) -> tuple[float, ...]:
    """--resolution, else the mesh layer's voxel size, else SNEMI3D's.

    Raises:
        DataError: --resolution differs from the mesh layer's (the layers would not overlap).
    """
    if layer is None:
        return tuple(given) if given is not None else DEFAULT_RESOLUTION
    if given is not None and tuple(float(v) for v in given) != layer.resolution:
        raise DataError(
            f"--resolution {' '.join(f'{v:g}' for v in given)}: the segmentation with meshes '{layer.folder}' has "
            f"voxel size {' '.join(f'{v:g}' for v in layer.resolution)} nm, expected the same (or no --resolution)"
        )
    return layer.resolution


def mesh_source(layer: MeshLayer | None, bind_address: str) -> tuple[str | None, list[int]]:
    """Serves a segmentation with meshes: (its neuroglancer source URL, the segments to select), or (None, [])."""
    global mesh_server
    if layer is None:
        return None, []
    mesh_server, url = serve_folder(layer.folder, bind_address)
    sizes = mesh_labels(layer)
    return f"precomputed://{url}", sorted(sizes, key=lambda label: (-sizes[label], label))[:SELECTED_MESHES]


@run_cli
def main(argv: list[str] | None = None) -> int:
    global viewer
    args = parse_args(argv)
    check_flags(args)
    layer = read_mesh_layer(args.segmentation)  # a folder written by python -m melecole.mesh, or None
    segmentation = f"precomputed://file://{layer.folder}" if layer else args.segmentation
    inputs = open_view_inputs(args.gt, segmentation, args.raw, args.affinities, args.membranes)
    volumes = dict(raw=inputs.raw, gt=inputs.gt, segmentation=inputs.segmentation, membranes=inputs.membranes)
    check_dimensions({**volumes, "affinities": inputs.affinities})
    if args.png:
        path = render_report(
            args.png,
            gt=inputs.gt,
            segmentation=inputs.segmentation,
            raw=inputs.raw,
            slices=args.slices,
            padding=args.padding,
            top_k=args.top_k,
        )
        print(f"wrote {path}")
        return 0
    resolution = view_resolution(args.resolution, layer)
    source, segments = mesh_source(layer, args.bind)
    state = build_viewer_state(
        raw=inputs.raw,
        gt=inputs.gt,
        segmentation=inputs.segmentation,
        affinities=inputs.affinities,
        membranes=inputs.membranes,
        resolution=resolution,
        padding=args.padding,
        segmentation_source=source,
        segments=segments,
    )
    viewer = start_viewer(state, bind_address=args.bind, port=args.port)
    print(viewer.get_viewer_url(), flush=True)
    if not sys.flags.interactive:
        print("serving; press Ctrl-C to stop (run with python -i to keep a prompt)", flush=True)
        threading.Event().wait()
    return 0

