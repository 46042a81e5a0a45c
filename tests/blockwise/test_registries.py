"""The segmentation's registries: a new fragment algorithm is one function + one registry entry + its
config keys, and the CLI choices and config validation read the tables."""

from __future__ import annotations

import subprocess
import sys

import cc3d
import numpy as np
import pytest

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import SerialExecutor, segment_blockwise
from melecole.blockwise.segment import segment_blockwise_in_memory
from melecole.config import get_default_cfg
from melecole.config.validate import _CHOICES
from melecole.errors import ConfigError
from melecole.io.volumes import open_volume
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES, agglomeration_mode
from melecole.segmentation.fragments import FRAGMENT_ALGORITHMS, FragmentAlgorithm, fragment_algorithm
from melecole.utils.offsets import number_of_attractive_channels


def threshold_components(affinities, offsets, foreground, background_threshold, level=0.5):
    """A toy fragment algorithm: 6-connected components of voxels whose weakest nearest-neighbour
    affinity (channels read: the attractive ones) is above ``level``."""
    interior = affinities[: number_of_attractive_channels(offsets)].min(axis=0) > level
    if foreground is not None:
        interior &= foreground >= background_threshold
    return cc3d.connected_components(interior, connectivity=6).astype(np.uint64)


@pytest.fixture()
def toy_registered(monkeypatch, blockwise_cfg):
    """The toy algorithm registered under "components" with its config key BLOCKWISE.COMPONENT_LEVEL."""
    entry = FragmentAlgorithm(threshold_components, "attractive", False, {"level": "BLOCKWISE.COMPONENT_LEVEL"})
    monkeypatch.setitem(FRAGMENT_ALGORITHMS, "components", entry)
    cfg = blockwise_cfg.clone()
    cfg.BLOCKWISE.COMPONENT_LEVEL = 0.6
    cfg.BLOCKWISE.FRAGMENTS = "components"
    return cfg


def test_a_registered_fragment_algorithm_runs_everywhere(toy_registered, tiny_volume, tmp_path):
    options = build_options(toy_registered)
    assert options.segmentation.fragments == "components"
    assert options.segmentation.fragment_params == (("level", 0.6),)
    assert options.fragment_channels == 3  # "attractive": the task reads and decodes only those
    in_memory, table = segment_blockwise_in_memory(tiny_volume["affinities"], options)
    assert len(table.fragments) > 20 and table.num_segments > 1
    output = tmp_path / "seg.zarr"
    segment_blockwise(
        f"{tiny_volume['path']}:affinities", str(output), options, executor=SerialExecutor(), progress=False,
        report=lambda line: None,
    )
    np.testing.assert_array_equal(open_volume(output).read(), in_memory)
    cfg = toy_registered.clone()
    cfg.BLOCKWISE.COMPONENT_LEVEL = 0.95  # its config key reaches the function
    other, _ = segment_blockwise_in_memory(tiny_volume["affinities"], build_options(cfg))
    assert not np.array_equal(other, in_memory)


def test_cli_and_validation_read_the_fragment_table(toy_registered, blockwise_cfg):
    from melecole.cli.blockwise import build_parser

    base = ["--affinities", "a.zarr", "--output", "o.zarr", "--config", "c.yaml"]
    assert build_parser().parse_args([*base, "--fragments", "components"]).fragments == "components"
    cfg = blockwise_cfg.clone()
    cfg.BLOCKWISE.FRAGMENTS = "slic"
    with pytest.raises(ConfigError, match="BLOCKWISE.FRAGMENTS: 'slic', expected one of mws, watershed, components"):
        build_options(cfg)
    with pytest.raises(ConfigError, match="--fragments: 'slic', expected one of mws, watershed, components"):
        build_options(blockwise_cfg, fragments="slic")


def test_cli_choices_and_config_choices_equal_the_registries():
    from melecole.cli.blockwise import build_parser

    fragments = next(action for action in build_parser()._actions if action.dest == "fragments")
    assert tuple(fragments.choices) == tuple(FRAGMENT_ALGORITHMS) == ("mws", "watershed")
    assert _CHOICES["INFERENCE.AGGLOMERATION"] == ("none", *AGGLOMERATION_MODES)
    assert get_default_cfg().BLOCKWISE.FRAGMENTS in FRAGMENT_ALGORITHMS
    assert get_default_cfg().BLOCKWISE.AGGLOMERATION in AGGLOMERATION_MODES
    for name, entry in FRAGMENT_ALGORITHMS.items():  # every config key an algorithm reads exists
        for key in entry.config_keys.values():
            group, field = key.split(".")
            assert field in get_default_cfg()[group], (name, key)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="fragment algorithm 'slic', expected one of mws, watershed"):
        fragment_algorithm("slic")
    with pytest.raises(ValueError, match="agglomeration mode 'gasp', expected one of mws, mean"):
        agglomeration_mode("gasp")


def test_segmentation_and_block_tasks_import_no_torch():
    code = (
        "import sys, melecole.segmentation.options, melecole.segmentation.volume, melecole.blockwise.tasks; "
        "bad = [m for m in ('torch', 'melecole.inference', 'melecole.evaluation', 'h5py') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
