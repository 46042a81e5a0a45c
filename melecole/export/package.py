"""``melecole-export``: a checkpoint (or ``zoo:NAME``) as TorchScript, ONNX or a bioimage.io package, checked.

Every format writes one folder ``--output DIR``:

- ``torchscript``: ``model.torchscript.pt`` (``torch.jit.load`` needs torch only, not this project);
- ``onnx``: ``model.onnx`` (opset 18, dynamic batch axis);
- ``bioimageio``: a bioimage.io model package (:mod:`melecole.export.bioimageio`): ``rdf.yaml``, both
  weight files, test tensors, ``documentation.md``, validated with bioimageio.spec and tested with
  bioimageio.core before it is put in place.

The graphs are those of :mod:`melecole.models.export`: ``raw`` float32 (N, 1, z, y, x) in [0, 1] ->
``embedding`` (N, E, z, y, x), ``foreground`` logits (N, 1, z, y, x); affinities are computed from the
embeddings outside the graph (``melecole-export.json`` records the offsets, DELTA_D and norm). Each export
is checked on a test window before it is put in place: the exported model's affinities must equal
PyTorch's within :data:`AFFINITY_TOLERANCE`.

Users' data is safe: the folder gets ``melecole-export.json`` (the library's mark, listing the files it
wrote); an existing ``--output`` is replaced only with ``overwrite`` and only if it holds that mark and
nothing else than the files it lists (an empty folder is used as new). The output may not be, contain or
lie inside the checkpoint. The folder is assembled under a temporary name and renamed into place whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import melecole
from melecole.errors import ConfigError, DataError
from melecole.io.checks import check_disjoint
from melecole.io.ownership import OWN_KEY, own_attributes
from melecole.utils.files import atomic_path

__all__ = [
    "AFFINITY_TOLERANCE",
    "EXPORT_FORMATS",
    "MARKER_NAME",
    "ExportSummary",
    "ExportedModel",
    "export_checkpoint",
    "load_exported_model",
    "sample_window",
]

logger = logging.getLogger(__name__)

MARKER_NAME = "melecole-export.json"
AFFINITY_TOLERANCE = 1e-4
TORCHSCRIPT_NAME = "model.torchscript.pt"
ONNX_NAME = "model.onnx"


@dataclass
class ExportedModel:
    """The checkpoint's model and what the export needs of it."""

    model: torch.nn.Module
    cfg: Any
    checkpoint: dict
    window: tuple[int, int, int]

    @property
    def affinity_settings(self) -> dict[str, Any]:
        """How affinities follow from the embeddings (docs/ARCHITECTURE.md, Conventions)."""
        return {
            "offsets": [list(map(int, offset)) for offset in self.cfg.INFERENCE.OFFSETS],
            "delta_d": float(self.cfg.LOSS.DELTA_D),
            "norm": str(self.cfg.LOSS.NORM),
        }

    def affinities(self, embedding: np.ndarray) -> np.ndarray:
        """(1, E, z, y, x) embeddings -> (C, z, y, x) affinities with the checkpoint's settings."""
        from melecole.inference.affinities import embeddings_to_affinities

        settings = self.affinity_settings
        return embeddings_to_affinities(
            np.asarray(embedding[0], dtype=np.float32), settings["offsets"], settings["delta_d"], settings["norm"]
        )

    def reference(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PyTorch's (embedding, foreground logits) for ``raw`` (N, 1, z, y, x) float32."""
        with torch.no_grad():
            outputs = self.model(torch.from_numpy(raw))
        return outputs["embedding"].numpy(), outputs["foreground"].numpy()


@dataclass
class ExportSummary:
    """What ``export_checkpoint`` wrote and measured."""

    format: str
    output: Path
    files: list[str]
    window: tuple[int, int, int]
    checks: dict[str, float] = field(default_factory=dict)
    report: str = ""


def load_exported_model(checkpoint: str | os.PathLike, window: Sequence[int] | None = None) -> ExportedModel:
    """The checkpoint's model (CPU, eval) with the export window (default: the inference window)."""
    from melecole.engine.checkpoint import build_model_from_checkpoint
    from melecole.inference.options import resolve_windows

    model, cfg, loaded = build_model_from_checkpoint(checkpoint, None, device="cpu")
    if window is None:
        window = resolve_windows(cfg)[0]
    window = tuple(int(size) for size in window)
    if len(window) != 3 or min(window) < 1:
        raise ConfigError(f"--window {list(window)}: expected 3 positive sizes (z, y, x)")
    factors = _downsampling(cfg)
    bad = [f"{axis} {size} (multiple of {factor})" for axis, size, factor in zip("zyx", window, factors)
           if size % factor]
    if bad:
        raise ConfigError(f"--window {list(window)}: {', '.join(bad)} expected, to suit the model's pooling")
    return ExportedModel(model, cfg, loaded, window)  # type: ignore[arg-type]


def _downsampling(cfg: Any) -> tuple[int, int, int]:
    """How much the UNet downsamples z, y, x (the window must be a multiple)."""
    levels = len(cfg.MODEL.FILTERS) - 1
    return 2 ** sum(bool(p) for p in cfg.MODEL.POOL_Z), 2**levels, 2**levels


def _data_root(cfg: Any) -> Path | None:
    """DATASET.DATA_ROOT as given (relative: to the working folder, then to the project root), if it exists."""
    root = Path(cfg.DATASET.DATA_ROOT)
    candidates = [root] if root.is_absolute() else [root, Path(melecole.__file__).resolve().parents[1] / root]
    return next((candidate for candidate in candidates if candidate.is_dir()), None)


def sample_window(cfg: Any, window: Sequence[int]) -> tuple[np.ndarray, str]:
    """A test window (1, 1, z, y, x) float32 in [0, 1] and where it comes from.

    The centre crop of the first validation volume of the checkpoint's data when that is at hand and
    large enough; otherwise deterministic noise (seed 0).
    """
    from melecole.data.volume import list_volumes
    from melecole.io.raw import normalize_raw
    from melecole.io.volumes import open_volume

    root = _data_root(cfg)
    try:
        files = list_volumes(root, cfg.DATASET.VAL_SPLIT) if root is not None else []
        volume = open_volume(f"{files[0]}:{cfg.DATASET.RAW_KEY}") if files else None
    except DataError:
        volume = None
    if volume is not None and volume.ndim == 3 and all(s >= w for s, w in zip(volume.shape, window)):
        start = [(s - w) // 2 for s, w in zip(volume.shape, window)]
        crop = np.asarray(volume[tuple(slice(a, a + w) for a, w in zip(start, window))])
        where = f"{files[0].name} [{cfg.DATASET.RAW_KEY}] z, y, x from {start}"
        return normalize_raw(crop)[None, None].astype(np.float32), where
    noise = np.random.default_rng(0).random((1, 1, *window), dtype=np.float32)
    return noise, "uniform noise in [0, 1] (seed 0): the checkpoint's validation data was not found"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    mark = value.get(OWN_KEY) if isinstance(value, dict) else None
    return value if isinstance(mark, dict) and mark.get("writer") == "melecole" else None


def check_output(output: Path, checkpoint_file: str, overwrite: bool) -> None:
    """The ownership rules of the module docstring; raises DataError naming what is in the way."""
    check_disjoint(output, {"--checkpoint": checkpoint_file}, "--output")
    if not os.path.lexists(output):
        return
    expected = "expected a new folder, or --overwrite of an earlier melecole-export output (nothing was touched)"
    if output.is_symlink() or not output.is_dir():
        raise DataError(f"--output '{output}' is a {'symlink' if output.is_symlink() else 'file'}, {expected}")
    entries = sorted(os.listdir(output))
    if not entries:
        return
    marker = _read_marker(output)
    if marker is None:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise DataError(f"--output '{output}' was not written by melecole-export (no {MARKER_NAME}; holds: {shown}), "
                        f"{expected}")
    if not overwrite:
        raise DataError(f"--output '{output}' holds an earlier export, {expected}")
    foreign = sorted(set(entries) - set(marker.get("files", [])) - {MARKER_NAME})
    if foreign:
        raise DataError(f"--output '{output}' holds entries melecole-export did not write ({', '.join(foreign[:5])}), "
                        f"{expected}")


def _max_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(first, np.float64) - np.asarray(second, np.float64))))


def _compare(exported: ExportedModel, raw: np.ndarray, embedding: np.ndarray, foreground: np.ndarray,
             what: str) -> dict[str, float]:
    """Max |difference| of affinities, embeddings and foreground to PyTorch's; DataError beyond tolerance."""
    reference_embedding, reference_foreground = exported.reference(raw)
    checks = {
        f"{what}_affinity_max_abs_diff": _max_difference(exported.affinities(embedding),
                                                         exported.affinities(reference_embedding)),
        f"{what}_embedding_max_abs_diff": _max_difference(embedding, reference_embedding),
        f"{what}_foreground_max_abs_diff": _max_difference(foreground, reference_foreground),
    }
    if checks[f"{what}_affinity_max_abs_diff"] > AFFINITY_TOLERANCE:
        raise DataError(f"{what} export: affinities differ from PyTorch's by "
                        f"{checks[f'{what}_affinity_max_abs_diff']:.2e} on the test window, expected <= "
                        f"{AFFINITY_TOLERANCE:g} (nothing was written)")
    return checks


def run_onnx(path: str | os.PathLike, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embedding, foreground logits) of an exported ONNX model under ONNX Runtime (CPU)."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("--format onnx / bioimageio need onnxruntime (pip install onnxruntime)") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding, foreground = session.run(None, {session.get_inputs()[0].name: raw})
    return embedding, foreground


def run_torchscript(path: str | os.PathLike, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embedding, foreground logits) of an exported TorchScript model."""
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        embedding, foreground = module(torch.from_numpy(raw))
    return embedding.numpy(), foreground.numpy()


def write_torchscript(exported: ExportedModel, folder: Path, raw: np.ndarray, name: str = TORCHSCRIPT_NAME) -> dict:
    """``folder/name`` and its check against PyTorch."""
    from melecole.models.export import export_torchscript

    export_torchscript(exported.model, exported.window, folder / name)
    return _compare(exported, raw, *run_torchscript(folder / name, raw), "torchscript")


def write_onnx(exported: ExportedModel, folder: Path, raw: np.ndarray, name: str = ONNX_NAME) -> dict:
    """``folder/name`` and its check against PyTorch under ONNX Runtime."""
    from melecole.models.export import export_onnx

    try:
        export_onnx(exported.model, exported.window, folder / name)
    except ImportError as error:
        raise ConfigError(f"--format onnx needs the ONNX exporter's packages ({error}; pip install onnx onnxscript)"
                          ) from None
    return _compare(exported, raw, *run_onnx(folder / name, raw), "onnx")


def _write_bioimageio(exported: ExportedModel, folder: Path, raw: np.ndarray, source: str) -> tuple[dict, str]:
    from melecole.export.bioimageio import write_package

    return write_package(exported, folder, raw, source, write_torchscript, write_onnx)


def _write_single(writer: Callable[..., dict]) -> Callable[..., tuple[dict, str]]:
    return lambda exported, folder, raw, source: (writer(exported, folder, raw), "")


# --format NAME -> writer(exported, folder, raw, sample description) -> (checks, report).
EXPORT_FORMATS: dict[str, Callable[..., tuple[dict, str]]] = {
    "torchscript": _write_single(write_torchscript),
    "onnx": _write_single(write_onnx),
    "bioimageio": _write_bioimageio,
}


def _marker(exported: ExportedModel, fmt: str, files: list[str], checks: dict, source: str) -> dict[str, Any]:
    checkpoint = exported.checkpoint
    return {
        **own_attributes("export", format=fmt),
        "files": files,
        "checkpoint": f"zoo:{checkpoint['zoo']}" if checkpoint.get("zoo") else str(checkpoint["path"]),
        "iteration": int(checkpoint.get("iteration", 0)),
        "input": {"name": "raw", "axes": "bczyx", "window": list(exported.window), "dtype": "float32",
                  "range": [0.0, 1.0], "normalisation": "uint8 raw / 255 (melecole.io.raw)"},
        "outputs": {"embedding": "bczyx float32", "foreground": "bczyx float32 logits (sigmoid -> probability)"},
        "affinities": exported.affinity_settings,
        "test_window": source,
        "checks": checks,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    window: Sequence[int] | None = None,
) -> ExportSummary:
    """Exports ``checkpoint`` (file, run folder or ``zoo:NAME``) in format ``fmt`` into the folder ``output``.

    Raises:
        ConfigError: unknown format, unsuitable window, a missing optional package.
        CheckpointError: unreadable checkpoint or unknown zoo name.
        DataError: ``output`` in the way (module docstring), or the exported model disagrees with PyTorch.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is not a known export format, expected one of: "
                          f"{', '.join(EXPORT_FORMATS)}")
    output = Path(output)
    exported = load_exported_model(checkpoint, window)
    check_output(output, exported.checkpoint["path"], overwrite)
    raw, source = sample_window(exported.cfg, exported.window)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, folder=True) as temporary:
        temporary.mkdir()
        checks, report = EXPORT_FORMATS[fmt](exported, temporary, raw, source)
        files = sorted(entry for entry in os.listdir(temporary) if entry != MARKER_NAME)
        marker = _marker(exported, fmt, files, checks, source)
        (temporary / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
    logger.info("exported %s as %s to %s", exported.checkpoint["path"], fmt, output)
    return ExportSummary(fmt, output, files, exported.window, checks, report)
