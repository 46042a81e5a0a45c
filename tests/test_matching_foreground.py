"""The blockwise CLI segments infer.py's stored affinities with the foreground stored beside them."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.cli import blockwise as blockwise_cli
from melecole.inference.outputs import FINGERPRINT_FORMAT, matching_foreground, output_paths, write_predictions

OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "synthetic-UNet3D.yaml")


def _stored(folder, prefix="val", print_=None):
    paths = output_paths(folder, prefix)
    attrs = {"fingerprint": print_ or json.dumps({"format": FINGERPRINT_FORMAT, "input": {"sha256": "ab"}})}
    rng = np.random.default_rng(0)
    write_predictions(paths, rng.random((3, 4, 8, 8)).astype(np.float16), rng.random((4, 8, 8)).astype(np.float16),
                      OFFSETS, attrs)  # fmt: skip
    return paths


def test_infer_outputs_pair_up(tmp_path):
    paths = _stored(tmp_path)
    expected = f"{paths['membranes']}:membranes"
    assert matching_foreground(str(paths["affinities"])) == expected
    assert matching_foreground(f"{paths['affinities']}:affinities") == expected


def test_no_pair_for_other_files(tmp_path):
    paths = _stored(tmp_path)
    assert matching_foreground(f"{paths['affinities']}:other") is None  # another dataset
    assert matching_foreground(str(tmp_path / "missing_affinities.hdf")) is None
    assert matching_foreground(str(tmp_path / "x.zarr")) is None
    renamed = tmp_path / "mine.hdf"
    paths["affinities"].rename(renamed)
    assert matching_foreground(str(renamed)) is None  # not infer.py's name


def test_no_pair_when_the_foreground_is_of_another_prediction(tmp_path):
    paths = _stored(tmp_path)
    with h5py.File(paths["membranes"], "r+") as handle:
        handle.attrs["fingerprint"] = json.dumps({"format": FINGERPRINT_FORMAT, "input": {"sha256": "cd"}})
    assert matching_foreground(str(paths["affinities"])) is None
    other = _stored(tmp_path / "old", print_=json.dumps({"format": "melecole-inference-v1"}))
    assert matching_foreground(str(other["affinities"])) is None  # another writer's format


@pytest.mark.parametrize("flags, expected", [([], "paired"), (["--no-foreground"], None), (["--foreground", "F"], "F")])
def test_cli_uses_the_pair_unless_told(tmp_path, monkeypatch, flags, expected):
    paths = _stored(tmp_path)
    seen = {}

    def fake_run(cfg, affinities, output, foreground_url=None, **keywords):
        seen["foreground"] = foreground_url

    monkeypatch.setattr("melecole.blockwise.orchestrate.run_blockwise", fake_run)
    arguments = ["--affinities", str(paths["affinities"]), "--output", str(tmp_path / "s.zarr"), "--config", CONFIG]
    code = blockwise_cli.main([*arguments, *flags])
    assert code == 0
    assert seen["foreground"] == (f"{paths['membranes']}:membranes" if expected == "paired" else expected)
