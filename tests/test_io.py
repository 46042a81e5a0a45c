"""melecole.io: volume URLs, lazy reads, zarr / precomputed round trips, atomic writes, chunked prediction."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.errors import DataError
from melecole.inference import predict_volume
from melecole.inference.chunked import predict_affinities_chunked
from melecole.io import create_volume, open_volume, parse_volume_url, write_volume

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [-2, 0, -3]]


def precomputed(path: Path) -> str:
    return f"precomputed://file://{path}"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("a/b.hdf", ("hdf5", "a/b.hdf", None)),
        ("b.h5:raw/volume", ("hdf5", "b.h5", "raw/volume")),
        ("/x/out.zarr", ("zarr", "/x/out.zarr", None)),
        ("/x/out.zarr:aff", ("zarr", "/x/out.zarr", "aff")),
        ("/x/out.zarr/raw/s0", ("zarr", "/x/out.zarr", "raw/s0")),
        ("zarr:///x/folder", ("zarr", "/x/folder", None)),
        ("precomputed://file:///x/seg", ("precomputed", "file:///x/seg", None)),
        ("precomputed://gs://bucket/seg", ("precomputed", "gs://bucket/seg", None)),
        ("s3://bucket/seg", ("precomputed", "s3://bucket/seg", None)),
    ],
)
def test_parse_volume_url(url, expected):
    parsed = parse_volume_url(url)
    assert (parsed.format, parsed.path, parsed.key) == expected


def test_unknown_url_is_a_clear_error():
    with pytest.raises(DataError, match="unknown format"):
        parse_volume_url("volume.tif")


def sample(kind: str, shape=(5, 17, 19)) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "uint64":
        return rng.integers(0, 2**40, shape, dtype=np.uint64) * (rng.random(shape) < 0.7)  # many 0s
    if kind == "uint32":
        return rng.integers(0, 50, shape, dtype=np.uint32)
    if kind == "affinities":
        return rng.random((3,) + shape, dtype=np.float32)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("kind", ["uint64", "uint32", "affinities", "uint8"])
@pytest.mark.parametrize("target", ["precomputed", "zarr2", "zarr3", "zarr_key"])
def test_round_trip(tmp_path, kind, target):
    import zarr

    if target == "zarr3" and int(zarr.__version__.split(".")[0]) < 3:
        pytest.skip(f"writing zarr v3 needs zarr-python >= 3, found {zarr.__version__}")
    data = sample(kind)
    layer_type = "segmentation" if kind.startswith("uint") and kind != "uint8" else "image"
    chunks = (4, 8, 8) if data.ndim == 3 else (3, 4, 8, 8)
    url = {
        "precomputed": precomputed(tmp_path / "layer"),
        "zarr2": str(tmp_path / "v.zarr"),
        "zarr3": str(tmp_path / "v3.zarr"),
        "zarr_key": f"{tmp_path / 'group.zarr'}:predictions/{kind}",
    }[target]
    write_volume(
        url,
        data,
        chunks=chunks,
        resolution=(30, 6, 4),
        layer_type=layer_type,
        zarr_format=3 if target == "zarr3" else 2,
    )
    volume = open_volume(url)
    assert volume.shape == data.shape and volume.dtype == data.dtype and volume.chunks == chunks
    assert volume.resolution == (30.0, 6.0, 4.0)
    np.testing.assert_array_equal(volume[:], data)
    np.testing.assert_array_equal(volume[..., 1:4, -5:, 3], data[..., 1:4, -5:, 3])  # unaligned box
    np.testing.assert_array_equal(
        np.asarray(volume.crop(np.s_[..., 2:5, 3:9, 4:19])), data[..., 2:5, 3:9, 4:19]
    )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temporary folders were renamed into place


def test_precomputed_segmentation_uses_compressed_segmentation(tmp_path):
    import json

    write_volume(precomputed(tmp_path / "seg"), sample("uint64"), layer_type="segmentation")
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert info["type"] == "segmentation" and info["scales"][0]["encoding"] == "compressed_segmentation"
    assert info["scales"][0]["size"] == [19, 17, 5]  # precomputed is (x, y, z)


def test_lazy_indexing(tmp_path):
    data = sample("uint8")
    write_volume(tmp_path / "a.zarr", data, chunks=(2, 8, 8))
    volume = open_volume(tmp_path / "a.zarr")
    assert volume[-1].shape == (17, 19)
    np.testing.assert_array_equal(volume[-1, 3], data[-1, 3])
    np.testing.assert_array_equal(volume.read((slice(1, 3),)), data[1:3])
    assert volume.astype(np.float32)[0].dtype == np.float32
    assert volume[2:2].shape == (0, 17, 19)
    with pytest.raises(IndexError, match="step 1"):
        volume[::2]


def test_failed_write_leaves_nothing_and_existing_outputs_are_kept(tmp_path):
    url = precomputed(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with create_volume(url, (4, 8, 8), np.uint8, chunks=(4, 8, 8)) as writer:
            writer[:, :, :] = np.ones((4, 8, 8), np.uint8)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_volume(url, np.full((4, 8, 8), 3, np.uint8))
    with pytest.raises(DataError, match="already exists"):
        write_volume(url, np.zeros((4, 8, 8), np.uint8))
    write_volume(url, np.full((4, 8, 8), 7, np.uint8), overwrite=True)
    assert open_volume(url)[0, 0, 0] == 7 and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hdf5_keys(tmp_path):
    path = tmp_path / "v.hdf"
    with h5py.File(path, "w") as handle:
        handle["volume"] = sample("uint8")
        handle["labels"] = sample("uint32")
    assert open_volume(f"{path}:labels").dtype == np.uint32
    assert open_volume(path, default_key="volume").dtype == np.uint8
    with pytest.raises(DataError, match="2 datasets"):
        open_volume(path)
    with pytest.raises(DataError, match="key 'nope' not found"):
        open_volume(f"{path}:nope")
    with pytest.raises(DataError, match="does not exist"):
        open_volume(tmp_path / "missing.hdf")
    with pytest.raises(DataError, match="does not exist"):
        open_volume(precomputed(tmp_path / "missing"))


class PointwiseModel(torch.nn.Module):
    """1x1x1 convolutions: affinities depend on the two voxels only, so chunking cannot change them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Conv3d(1, 3, 1)
        self.foreground = torch.nn.Conv3d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding(x), "foreground": self.foreground(x)}


PREDICT = dict(window=(4, 8, 8), offsets=OFFSETS, delta_d=1.5, blending="constant", batch_size=8)


@pytest.mark.parametrize("source_format, sink_format", [("precomputed", "zarr"), ("zarr", "precomputed")])
def test_chunked_prediction_equals_whole_volume(tmp_path, source_format, sink_format):
    raw = sample("uint8", (9, 21, 26))
    source = precomputed(tmp_path / "raw") if source_format == "precomputed" else str(tmp_path / "raw.zarr")
    write_volume(source, raw, chunks=(4, 8, 8))
    sink = precomputed(tmp_path / "aff") if sink_format == "precomputed" else str(tmp_path / "aff.zarr")
    foreground_sink = str(tmp_path / "fg.zarr")
    model = PointwiseModel()
    summary = predict_affinities_chunked(
        model,
        source,
        sink,
        chunk_shape=(4, 8, 16),
        halo=(2, 3, 3),
        foreground_sink=foreground_sink,
        progress=False,
        **PREDICT,
    )
    assert summary.chunks == 3 * 3 * 2 and summary.shape == (len(OFFSETS), 9, 21, 26)
    expected, expected_foreground = predict_volume(model, raw, progress=False, **PREDICT)
    np.testing.assert_allclose(open_volume(sink)[:], expected, atol=1e-6)
    np.testing.assert_allclose(open_volume(foreground_sink)[:], expected_foreground, atol=1e-6)
    assert (expected[3, :, :3] == 0).all() and (expected[3, :, 3:] > 0).all()  # pairs leaving the volume


def test_chunked_prediction_uint8_output_and_checks(tmp_path):
    raw = sample("uint8", (6, 16, 16))
    write_volume(tmp_path / "raw.zarr", raw)
    model = PointwiseModel()
    predict_affinities_chunked(
        model,
        str(tmp_path / "raw.zarr"),
        precomputed(tmp_path / "aff"),
        chunk_shape=(3, 8, 8),
        output_dtype="uint8",
        progress=False,
        **PREDICT,
    )
    stored = open_volume(precomputed(tmp_path / "aff"))
    expected, _ = predict_volume(model, raw, progress=False, **PREDICT)
    assert stored.dtype == np.uint8 and stored.chunks == (len(OFFSETS), 3, 8, 8)
    assert np.abs(stored[:] / 255.0 - expected).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="largest"):
        predict_affinities_chunked(
            model,
            str(tmp_path / "raw.zarr"),
            str(tmp_path / "x.zarr"),
            halo=(0, 0, 0),
            progress=False,
            **PREDICT,
        )
    write_volume(tmp_path / "raw16.zarr", raw.astype(np.uint16))
    with pytest.raises(DataError, match="value_range"):
        predict_affinities_chunked(
            model, str(tmp_path / "raw16.zarr"), str(tmp_path / "y.zarr"), progress=False, **PREDICT
        )
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_inference_on_precomputed_equals_hdf5(tmp_path):
    from melecole.models import UNet3D

    raw = sample("uint8", (8, 32, 32))
    with h5py.File(tmp_path / "raw.hdf", "w") as handle:
        handle["volume"] = raw
    write_volume(precomputed(tmp_path / "raw"), raw, chunks=(4, 16, 16))
    torch.manual_seed(0)
    model = UNet3D(filters=(4, 8), pool_z=(False,), embedding_dim=4, norm="none")
    options = dict(window=(4, 16, 16), offsets=OFFSETS, delta_d=1.5, progress=False)
    from_hdf5 = predict_volume(model, open_volume(f"{tmp_path / 'raw.hdf'}:volume")[:], **options)
    from_precomputed = predict_volume(model, open_volume(precomputed(tmp_path / "raw"))[:], **options)
    for a, b in zip(from_hdf5, from_precomputed):
        np.testing.assert_array_equal(a, b)
