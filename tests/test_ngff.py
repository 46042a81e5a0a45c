"""OME-Zarr (NGFF) on every zarr MeLeCoLe writes, validated by ome-zarr-models; NGFF inputs read by their metadata."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from ome_zarr_models.v04.axes import Axis as AxisV04
from ome_zarr_models.v04.image import Image as ImageV04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabelV04
from ome_zarr_models.v05.axes import Axis as AxisV05
from ome_zarr_models.v05.image import Image as ImageV05
from ome_zarr_models.v05.image_label import ImageLabel as ImageLabelV05

from melecole.errors import DataError
from melecole.io import create_volume, ensure_work_array, open_volume, open_work_array, write_volume
from melecole.io.ngff import Level, image_attributes, read_image
from melecole.io.ownership import check_replaceable, read_own_attributes

RESOLUTION = (30.0, 6.0, 6.0)


def validated(path: Path, label: bool):
    """The ome-zarr-models model of the image group at ``path`` (0.4 for zarr v2, 0.5 for v3): validation."""
    group = zarr.open_group(str(path), mode="r")
    if group.metadata.zarr_format == 2:
        return (ImageLabelV04 if label else ImageV04).from_zarr(group)
    return (ImageLabelV05 if label else ImageV05).from_zarr(group)


def multiscale(model):
    attributes = model.ome_attributes if model.ome_zarr_version == "0.5" else model.attributes
    return attributes.multiscales[0]


def scale_and_units(model) -> tuple[list[float], list[str | None]]:
    """What napari-ome-zarr / neuroglancer read: level 0's scale and the axes' units, through the package."""
    first = multiscale(model)
    return list(first.datasets[0].coordinateTransformations[0].scale), [axis.unit for axis in first.axes]


# ------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_written_segmentation_is_an_ngff_label_image_with_its_voxel_size(tmp_path, zarr_format):
    labels = np.arange(4 * 8 * 8, dtype=np.uint64).reshape(4, 8, 8) % 5
    url = f"{tmp_path / 'out.zarr'}:segmentation"
    write_volume(url, labels, chunks=(2, 4, 4), resolution=RESOLUTION, layer_type="segmentation",
                 zarr_format=zarr_format)
    group = tmp_path / "out.zarr" / "segmentation"
    model = validated(group, label=True)
    assert model.ome_zarr_version == ("0.4" if zarr_format == 2 else "0.5")
    assert scale_and_units(model) == (list(RESOLUTION), ["nanometer"] * 3)
    assert [axis.name for axis in multiscale(model).axes] == ["z", "y", "x"]
    assert [dataset.path for dataset in multiscale(model).datasets] == ["0"]
    # The URL of the group reads its level-0 array, with the voxel size (also as out.zarr/segmentation).
    for name in (url, tmp_path / "out.zarr" / "segmentation"):
        volume = open_volume(name)
        assert volume.resolution == RESOLUTION and volume.chunks == (2, 4, 4)
        np.testing.assert_array_equal(volume[:], labels)
    assert read_own_attributes(group)["kind"] == "segmentation"  # the mark is on the group
    check_replaceable(group, "test")  # an own NGFF output may be overwritten
    write_volume(url, labels + 1, resolution=RESOLUTION, layer_type="segmentation", overwrite=True,
                 zarr_format=zarr_format)
    np.testing.assert_array_equal(open_volume(url)[:], labels + 1)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_channel_volumes_are_ngff_images_with_a_channel_axis(tmp_path, zarr_format):
    affinities = np.random.default_rng(0).random((3, 4, 8, 8), dtype=np.float32)
    write_volume(tmp_path / "aff.zarr", affinities, resolution=(40, 4, 4), zarr_format=zarr_format)
    model = validated(tmp_path / "aff.zarr", label=False)
    axes = multiscale(model).axes
    assert [(axis.name, axis.type, axis.unit) for axis in axes] == [
        ("c", "channel", None), ("z", "space", "nanometer"), ("y", "space", "nanometer"), ("x", "space", "nanometer")
    ]
    assert scale_and_units(model)[0] == [1.0, 40.0, 4.0, 4.0]
    assert "image-label" not in json.dumps(dict(zarr.open_group(str(tmp_path / "aff.zarr"), mode="r").attrs))
    volume = open_volume(tmp_path / "aff.zarr")
    assert volume.shape == affinities.shape and volume.resolution == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(volume[:], affinities)


def test_a_group_of_images_lists_each_image_once(tmp_path):
    write_volume(f"{tmp_path / 'g.zarr'}:raw", np.ones((2, 4, 4), np.uint8))
    write_volume(f"{tmp_path / 'g.zarr'}:seg/s0", np.full((2, 4, 4), 3, np.uint64), layer_type="segmentation")
    with pytest.raises(DataError, match=r"holds 2 arrays \(raw, seg/s0\); name one as") as caught:
        open_volume(tmp_path / "g.zarr")
    assert "\n" not in str(caught.value)
    assert open_volume(tmp_path / "g.zarr", default_key="raw").url.endswith("g.zarr:raw")
    assert open_volume(f"{tmp_path / 'g.zarr'}:seg/s0/0")[0, 0, 0] == 3  # the level array itself, by path
    with pytest.raises(DataError, match=r"'seg' is a group, not an array or OME-Zarr image; it holds: s0$"):
        open_volume(f"{tmp_path / 'g.zarr'}:seg")


def test_image_attributes_record_pyramid_levels_with_their_offsets():
    levels = [Level("0", RESOLUTION), Level("1", (30.0, 12.0, 12.0), (0.0, 3.0, 3.0))]
    attributes = image_attributes(False, levels, zarr_format=2, label=True, name="seg", downsampling="mode")
    first = attributes["multiscales"][0]
    assert first["type"] == "mode" and first["name"] == "seg" and attributes["image-label"] == {"version": "0.4"}
    assert first["datasets"][1]["coordinateTransformations"] == [
        {"type": "scale", "scale": [30.0, 12.0, 12.0]}, {"type": "translation", "translation": [0.0, 3.0, 3.0]}
    ]
    image = read_image(attributes, "x.zarr:seg")
    assert image.paths == ("0", "1") and image.resolutions == (RESOLUTION, (30.0, 12.0, 12.0)) and image.label


def test_writers_leave_nothing_under_the_final_name_before_the_commit(tmp_path):
    writer = create_volume(f"{tmp_path / 'out.zarr'}:seg", (2, 4, 4), np.uint64, layer_type="segmentation")
    writer[:, :, :] = np.full((2, 4, 4), 9, np.uint64)
    assert not (tmp_path / "out.zarr").exists()
    writer.commit()
    assert sorted(p.name for p in (tmp_path / "out.zarr" / "seg").iterdir()) == [".zattrs", ".zgroup", "0"]


def test_the_segmentation_work_array_is_a_label_image_written_in_place(tmp_path):
    path = tmp_path / "segmentation.zarr"
    ensure_work_array(path, (4, 8, 8), (2, 4, 4), np.uint64, RESOLUTION, layer_type="segmentation")
    open_work_array(path)[0:2, 0:4, 0:4] = np.full((2, 4, 4), 7, np.uint64)
    ensure_work_array(path, (4, 8, 8), (2, 4, 4), np.uint64, RESOLUTION, layer_type="segmentation")  # resume
    assert int(open_volume(path)[:].sum()) == 7 * 32  # kept
    assert scale_and_units(validated(path, label=True)) == (list(RESOLUTION), ["nanometer"] * 3)
    ensure_work_array(tmp_path / "fragments.zarr", (4, 8, 8), (2, 4, 4), np.uint64, RESOLUTION)
    assert (tmp_path / "fragments.zarr" / ".zarray").is_file()  # other work arrays stay plain arrays


# ------------------------------------------------------------------------------------------- reading


def write_foreign_image(path: Path, data: np.ndarray, version: str, unit: str | None = "micrometer") -> None:
    """An NGFF image as another tool writes it: levels s0 (data) and s1 (x2 in y, x), scale in ``unit``."""
    from pydantic_zarr import v2, v3

    image, axis = (ImageV04, AxisV04) if version == "0.4" else (ImageV05, AxisV05)
    levels = [data, data[:, ::2, ::2]]
    if version == "0.4":
        specs = [v2.ArraySpec.from_array(level, chunks=(2, 4, 4)) for level in levels]
    else:
        grid = {"name": "regular", "configuration": {"chunk_shape": [2, 4, 4]}}
        specs = [v3.ArraySpec.from_array(level, chunk_grid=grid, dimension_names=list("zyx")) for level in levels]
    model = image.new(
        array_specs=specs, paths=["s0", "s1"], axes=[axis(name=n, type="space", unit=unit) for n in "zyx"],
        scales=[[0.03, 0.006, 0.006], [0.03, 0.012, 0.012]], translations=[None, None],
    )
    group = model.to_zarr(zarr.storage.LocalStore(str(path)), path="")
    for name, level in zip(("s0", "s1"), levels):
        group[name][:] = level


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_an_ngff_input_reads_its_level_0_array_and_voxel_size_in_nm(tmp_path, version):
    data = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    write_foreign_image(tmp_path / "em.zarr", data, version)
    volume = open_volume(tmp_path / "em.zarr")
    assert volume.shape == data.shape and volume.resolution == pytest.approx(RESOLUTION)
    np.testing.assert_array_equal(volume[:], data)
    assert open_volume(f"{tmp_path / 'em.zarr'}:s1").resolution == pytest.approx((30.0, 12.0, 12.0))
    write_foreign_image(tmp_path / "voxels.zarr", data, version, unit=None)
    assert open_volume(tmp_path / "voxels.zarr").resolution is None  # no unit: the voxel size is unknown


def break_metadata(path: Path, change) -> None:
    attributes_file = path / ".zattrs"
    attributes = json.loads(attributes_file.read_text())
    change(attributes["multiscales"][0])
    attributes_file.write_text(json.dumps(attributes))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(datasets=[]), r"field multiscales\[0\]\.datasets: Tuple should have at least 1 item"),
        (lambda m: m["datasets"][0].update(path="missing"),
         r"field multiscales\[0\]\.datasets\[0\]\.path is 'missing', which names no array"),
        (lambda m: m["axes"].insert(0, {"name": "c", "type": "channel"}) or [
            d["coordinateTransformations"][0]["scale"].insert(0, 1.0) for d in m["datasets"]],
         r"field multiscales\[0\]\.axes has 4 axes \(c, z, y, x\) but the level-0 array 's0' has 3 dimensions"),
        (lambda m: m["axes"][2].update(unit="second"),
         r"field multiscales\[0\]\.axes\[2\]\.unit is 'second', expected a length unit"),
        (lambda m: m["axes"].reverse(), r"field multiscales\[0\]\.axes is \['x', 'y', 'z'\], expected z, y, x"),
        (lambda m: m.update(version="0.3"), r"field multiscales\[0\]\.version is '0\.3', expected '0\.4'"),
    ],
)
def test_bad_ngff_input_is_one_line_naming_the_file_and_field(tmp_path, change, message):
    write_foreign_image(tmp_path / "em.zarr", np.zeros((4, 8, 8), np.uint8), "0.4")
    break_metadata(tmp_path / "em.zarr", change)
    with pytest.raises(DataError, match=message) as caught:
        open_volume(tmp_path / "em.zarr")
    assert str(caught.value).startswith(f"{tmp_path / 'em.zarr'}: OME-Zarr") and "\n" not in str(caught.value)


def test_a_users_ngff_image_is_never_replaced(tmp_path):
    write_foreign_image(tmp_path / "em.zarr", np.zeros((4, 8, 8), np.uint8), "0.4")
    with pytest.raises(DataError, match="was not written by MeLeCoLe"):
        write_volume(tmp_path / "em.zarr", np.zeros((4, 8, 8), np.uint8), overwrite=True)
    assert open_volume(tmp_path / "em.zarr").shape == (4, 8, 8)


# ----------------------------------------------------------------------------- infer.py and blockwise


def test_infer_uses_an_ngff_inputs_voxel_size_and_writes_an_ngff_segmentation(tmp_path):
    import infer
    from melecole.config import load_cfg
    from melecole.engine.checkpoint import save_checkpoint
    from melecole.models import build_model

    options = ["MODEL.INPUT_SIZE", "[8, 32, 32]", "MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]",
               "MODEL.EMBEDDING_DIMENSION", "4", "HARDWARE.DEVICE", "cpu", "LOG.PROGRESS_BAR", "False"]
    cfg = load_cfg(None, options)
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=1)
    raw = np.random.default_rng(0).integers(0, 256, (8, 32, 32)).astype(np.uint8)
    write_foreign_image(tmp_path / "em.zarr", raw, "0.4")
    out = tmp_path / "out.zarr"
    argv = ["--input", str(tmp_path / "em.zarr"), "--output-dir", str(tmp_path / "a"), "--output-precomputed",
            str(out), "--config", str(tmp_path / "tiny.yaml"), "--checkpoint", str(checkpoint)]
    assert infer.main(argv) == 0
    segmentation = validated(out / "segmentation", label=True)
    assert scale_and_units(segmentation)[0] == pytest.approx(list(RESOLUTION))  # the input's, in nm
    assert scale_and_units(validated(out / "affinities", label=False))[0] == pytest.approx([1.0, *RESOLUTION])
    with h5py.File(tmp_path / "a" / "results" / "last" / "em_segmentation.hdf") as handle:
        np.testing.assert_array_equal(open_volume(f"{out}:segmentation")[:], handle["segmentation"][()])


def test_a_blockwise_segmentation_is_an_ngff_label_image(tmp_path):
    from melecole.blockwise.plan import build_options
    from melecole.blockwise.runner import SerialExecutor, segment_blockwise
    from melecole.config import get_default_cfg
    from melecole.inference.affinities import affinities_from_labels

    cfg = get_default_cfg()
    cfg.BLOCKWISE.OUTPUT_CHUNKS = [8, 16, 16]
    cfg.BLOCKWISE.BLOCK_SHAPE = [8, 16, 16]
    cfg.LOG.PROGRESS_BAR = False
    labels = np.ones((16, 32, 32), np.uint32)
    labels[:, 16:] = 2
    affinities = affinities_from_labels(labels, cfg.INFERENCE.OFFSETS).astype(np.float32)
    write_volume(tmp_path / "aff.zarr", affinities, resolution=RESOLUTION)
    output = tmp_path / "seg.zarr"
    options = build_options(cfg)
    run = dict(executor=SerialExecutor(), progress=False, report=lambda line: None)
    segment_blockwise(str(tmp_path / "aff.zarr"), str(output), options, **run)
    model = validated(output, label=True)
    assert scale_and_units(model) == (list(RESOLUTION), ["nanometer"] * 3)
    mark = read_own_attributes(output)
    assert mark["complete"] and mark["kind"] == "blockwise-segmentation"
    segmentation = open_volume(output)[:]
    assert segmentation.shape == labels.shape and len(np.unique(segmentation[:, :16])) == 1
    assert segmentation[0, 0, 0] != segmentation[0, 31, 0]
    segment_blockwise(str(tmp_path / "aff.zarr"), str(output), options, overwrite=True, **run)  # replaceable
    np.testing.assert_array_equal(open_volume(output)[:], segmentation)
