"""A bioimage.io model package (model description format 0.5) of a checkpoint, validated and tested offline.

The package folder holds ``rdf.yaml``, ``weights_torchscript.pt`` (the original format) and ``weights.onnx``
(converted from it), ``test_input.npy`` (a (1, 1, z, y, x) window of real EM when the checkpoint's data is at
hand), ``test_output_embedding.npy`` and ``test_output_foreground.npy`` (PyTorch's outputs, the foreground
after the sigmoid post-processing the description declares), ``documentation.md`` (inputs, outputs and the
embedding -> affinity -> mutex watershed post-processing with this checkpoint's numbers) and
``bioimageio_test.md`` (bioimage.io's test report).

Validation runs with bioimageio.spec's file checks on (hashes of every file) but the description names no
URL, so nothing is downloaded; bioimageio.core's ``test_model`` then runs both weight formats on the test
input and compares with the test outputs. A package that fails either is not put in place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from melecole.errors import ConfigError, DataError

__all__ = ["BIOIMAGEIO_FORMAT_VERSION", "describe_package", "validate_package", "write_package"]

BIOIMAGEIO_FORMAT_VERSION = "0.5.4"
TORCHSCRIPT_FILE = "weights_torchscript.pt"
ONNX_FILE = "weights.onnx"
DEFAULT_LICENSE = "MIT"
CITATIONS = [
    {"text": "Lee, Zung, Li, Jain, Seung (2019): Learning dense voxel embeddings for 3D neuron reconstruction",
     "doi": "10.48550/arXiv.1909.09872"},
    {"text": "Wolf et al. (2020): The mutex watershed and its objective: efficient, parameter-free graph "
             "partitioning (IEEE TPAMI)", "doi": "10.1109/TPAMI.2020.2980827"},
]
DATA_CITATIONS = {
    "fib-gala": {"text": "Nunez-Iglesias et al. (2014): Graph-based active learning of agglomeration (GALA)",
                 "doi": "10.3389/fninf.2014.00034"},
    "medulla": {"text": "Parag et al. (2015): A context-aware delayed agglomeration framework for electron "
                        "microscopy segmentation (NeuroProof)", "doi": "10.1371/journal.pone.0125825"},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zoo_manifest(checkpoint: dict) -> dict[str, Any] | None:
    if not checkpoint.get("zoo"):
        return None
    from melecole.zoo import get_model

    return get_model(checkpoint["zoo"]).manifest


def _axes(channels: list[str], window: tuple[int, ...], voxel_size: list[float] | None) -> list[dict]:
    space = []
    for axis, size, scale in zip("zyx", window, voxel_size or [None] * 3):
        entry: dict[str, Any] = {"type": "space", "id": axis, "size": int(size)}
        if scale is not None:
            entry.update(unit="nanometer", scale=float(scale))
        space.append(entry)
    return [{"type": "batch"}, {"type": "channel", "channel_names": channels}, *space]


def describe_package(exported: Any, folder: Path, license: str = DEFAULT_LICENSE) -> dict[str, Any]:
    """The rdf.yaml content for the files already in ``folder`` (their SHA-256 included)."""
    manifest = _zoo_manifest(exported.checkpoint)
    name = f"MeLeCoLe {manifest['name']}" if manifest else f"MeLeCoLe {Path(exported.checkpoint['path']).stem} model"
    voxel_size = manifest["data"]["voxel_size_nm"] if manifest else None
    embedding_dim = int(exported.cfg.MODEL.EMBEDDING_DIMENSION)
    cite = list(CITATIONS) + ([DATA_CITATIONS[manifest["data"]["name"]]]
                              if manifest and manifest["data"]["name"] in DATA_CITATIONS else [])

    def tensor(name: str, channels: list[str], description: str, **extra: Any) -> dict[str, Any]:
        file = "test_input.npy" if name == "raw" else f"test_output_{name}.npy"
        return {"id": name, "description": description, "axes": _axes(channels, exported.window, voxel_size),
                "test_tensor": {"source": file, "sha256": _sha256(folder / file)}, **extra}

    return {
        "type": "model",
        "format_version": BIOIMAGEIO_FORMAT_VERSION,
        "name": name,
        "description": "3D UNet voxel embeddings and foreground probability for neuron segmentation in EM "
                       "(affinities from the embeddings, then mutex watershed; see documentation.md)",
        "authors": [{"name": "MeLeCoLe developers"}],
        "cite": cite,
        "license": license,
        "documentation": "documentation.md",
        "tags": ["3d", "electron-microscopy", "fib-sem", "neurons", "instance-segmentation", "embeddings",
                 "affinities", "mutex-watershed", "pytorch"],
        "inputs": [tensor("raw", ["raw"], "EM intensities scaled to [0, 1] (uint8 / 255)",
                          data={"type": "float32", "range": [0.0, 1.0]})],
        "outputs": [
            tensor("embedding", [f"embedding{index}" for index in range(embedding_dim)],
                   "voxel embeddings; affinities follow from distances between them (documentation.md)"),
            tensor("foreground", ["foreground"], "probability that the voxel lies inside a neuron",
                   postprocessing=[{"id": "sigmoid"}]),
        ],
        "weights": {
            "torchscript": {"source": TORCHSCRIPT_FILE, "sha256": _sha256(folder / TORCHSCRIPT_FILE),
                            "pytorch_version": torch.__version__.split("+")[0]},
            "onnx": {"source": ONNX_FILE, "sha256": _sha256(folder / ONNX_FILE), "opset_version": 18,
                     "parent": "torchscript"},
        },
    }


def _segmentation_steps(cfg: Any) -> str:
    """Steps 2 and on of the documentation's post-processing, with this config's segmentation settings."""
    inference = cfg.INFERENCE
    power = float(inference.MWS_FOREGROUND_POWER)
    watershed = ("2. **Mutex watershed**: nearest-neighbour channels attract with weight a, long-range channels "
                 "repel with\n   weight 1 - a")
    if power > 0:
        watershed += f", each attractive weight multiplied by min(foreground of its two voxels)^{power:g}"
    watershed += (f"; voxels whose foreground probability is below {float(inference.MWS_BACKGROUND):g} are "
                  "left\n   out (label 0).")
    steps = [watershed]
    if inference.AGGLOMERATION != "none":
        steps.append(f"{len(steps) + 2}. **Agglomeration**: the watershed's segments are merged on their region "
                     f"graph ({inference.AGGLOMERATION},\n   threshold {float(inference.AGGLOMERATION_THRESHOLD):g}).")
    if not inference.FILL_BACKGROUND:
        fill = "background voxels stay 0"
    elif inference.FILL_MODE == "watershed":
        fill = "background voxels are filled by a watershed of the segments on 1 - foreground"
    else:
        fill = "background voxels take the label of the nearest segment"
    steps.append(f"{len(steps) + 2}. **Clean-up**: segments under {int(inference.MIN_SEGMENT_SIZE)} voxels are "
                 f"removed and\n   {fill}.")
    return "\n".join(steps)


def _documentation(exported: Any, source: str, manifest: dict[str, Any] | None) -> str:
    """documentation.md: the model, its inputs and outputs, and the post-processing with this checkpoint's values."""
    cfg, settings = exported.cfg, exported.affinity_settings
    norm = "Euclidean (l2)" if settings["norm"] == "l2" else "l1"
    zoo = exported.checkpoint.get("zoo")
    label = f"zoo:{zoo}" if zoo else Path(exported.checkpoint["path"]).name
    origin = [f"- checkpoint: `{label}`, iteration {exported.checkpoint.get('iteration', 0)}"]
    if manifest:
        data, evaluation = manifest["data"], manifest["evaluation"]
        origin += [f"- training data: {data['source']} (licence: {data['licence']}), voxel size "
                   f"{data['voxel_size_nm']} nm (z, y, x)",
                   f"- trained with: `{manifest['training']['command']}`",
                   f"- {evaluation['split']} scores (MeLeCoLe's own pipeline): VI {evaluation['vi']:.3f} bits "
                   f"(split {evaluation['vi_split']:.3f}, merge {evaluation['vi_merge']:.3f}), adapted Rand error "
                   f"{evaluation['arand']:.3f}"]
    offsets = ", ".join(str(tuple(offset)) for offset in settings["offsets"])
    return f"""# MeLeCoLe neuron segmentation model

A residual 3D UNet (MeLeCoLe, metric learning for neuron segmentation in 3D electron microscopy) trained
with a discriminative metric loss: voxels of one neuron get nearby embeddings, voxels of different
neurons distant ones. A second head predicts the foreground (inside a neuron vs. boundary / background).

{chr(10).join(origin)}

## Input

`raw`: float32 (batch, 1, z, y, x), window {list(exported.window)} (z, y, x), EM intensities scaled
to [0, 1] (uint8 raw divided by 255; other data mapped from the volume's min / max). Axes are z, y, x.

## Outputs

- `embedding`: float32 (batch, {cfg.MODEL.EMBEDDING_DIMENSION}, z, y, x) voxel embeddings.
- `foreground`: float32 (batch, 1, z, y, x), the probability of foreground (the network's logits after
  the declared sigmoid).

## Post-processing: embeddings -> affinities -> segmentation

The package stops at the network outputs; MeLeCoLe (`melecole-infer`) does the rest:

1. **Affinities**, inside each window: for every voxel p and offset o in
   [{offsets}] (dz, dy, dx; the first 3 are the nearest neighbours),
   d = ||e(p) - e(p + o)|| ({norm} norm) and a = max(0, 1 - d / (2 * {settings['delta_d']:g}))^2, in [0, 1]
   (1 = same neuron). Pairs leaving the window are invalid (0). Windows overlap with stride
   {list(cfg.INFERENCE.STRIDE) or 'half the window'}, a margin of {list(cfg.INFERENCE.MARGIN)} voxels is
   cropped, and affinities (not embeddings: two windows' embeddings need not share a frame) are blended
   with {cfg.INFERENCE.BLENDING} weights. Test-time augmentation: {cfg.INFERENCE.TTA}.
{_segmentation_steps(cfg)}

## Validation

The test tensors are a window of {source}. bioimage.io's test runs both weight formats on it and
compares with PyTorch's outputs; `melecole-export` also checks that ONNX Runtime's affinities equal
PyTorch's within 1e-4. Segmentation quality must be judged on whole volumes with the post-processing
above (the validation scores above come from it).

## Limitations

Trained on a few small FIB-SEM volumes of fruit-fly neuropil on a CPU budget: expect to fine-tune on your
own labels (`melecole-train --config CONFIG --supervised_checkpoint zoo:NAME`).
"""


def validate_package(rdf: Path) -> tuple[str, str]:
    """(bioimageio.spec status, bioimageio.core test report) of the package; DataError if either fails."""
    try:
        from bioimageio.core import test_model
        from bioimageio.spec import InvalidDescr, load_description
    except ImportError:
        raise ConfigError("--format bioimageio needs bioimageio.spec and bioimageio.core "
                          "(pip install bioimageio.core)") from None
    description = load_description(rdf, perform_io_checks=True)
    status = description.validation_summary.status
    if isinstance(description, InvalidDescr) or status not in ("valid-format", "passed"):
        errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in description.validation_summary.errors[:3])
        raise DataError(f"bioimage.io package '{rdf.parent}': bioimageio.spec says {status}: {errors} "
                        "(nothing was written)")
    summary = test_model(rdf)
    report = summary.format()
    if summary.status != "passed":
        failed = [detail.name for detail in summary.details if detail.status == "failed"][:3]
        raise DataError(f"bioimage.io package '{rdf.parent}': bioimageio.core test_model {summary.status} "
                        f"({'; '.join(failed)}) (nothing was written)")
    return status, report


def write_package(exported: Any, folder: Path, raw: np.ndarray, source: str,
                  write_torchscript: Callable[..., dict], write_onnx: Callable[..., dict],
                  license: str = DEFAULT_LICENSE) -> tuple[dict[str, float], str]:
    """Writes the package into ``folder`` (a new, empty temporary folder), validates and tests it.

    Returns:
        (checks: max differences of the exported weights to PyTorch, bioimageio.core's test report).
    """
    checks = write_torchscript(exported, folder, raw, TORCHSCRIPT_FILE)
    checks.update(write_onnx(exported, folder, raw, ONNX_FILE))
    embedding, foreground = exported.reference(raw)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output_embedding.npy", embedding)
    np.save(folder / "test_output_foreground.npy", torch.sigmoid(torch.from_numpy(foreground)).numpy())
    manifest = _zoo_manifest(exported.checkpoint)
    (folder / "documentation.md").write_text(_documentation(exported, source, manifest))
    rdf = folder / "rdf.yaml"
    rdf.write_text(yaml.safe_dump(describe_package(exported, folder, license), sort_keys=False))
    status, report = validate_package(rdf)
    (folder / "bioimageio_test.md").write_text(report)
    checks["bioimageio_spec_valid"] = 1.0 if status in ("valid-format", "passed") else 0.0
    return checks, report
