"""infer.py --blockwise: chunked affinities from a checkpoint, then the blockwise segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melecole.blockwise.plan import build_options
from melecole.blockwise.segment import segment_affinities
from melecole.config import load_cfg
from melecole.engine.checkpoint import save_checkpoint
from melecole.io import open_volume, write_volume
from melecole.models import build_model

TINY = [
    "MODEL.INPUT_SIZE", "[8, 32, 32]", "MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]",
    "MODEL.EMBEDDING_DIMENSION", "4", "HARDWARE.DEVICE", "cpu", "LOG.PROGRESS_BAR", "False",
    "INFERENCE.WINDOW_SIZE", "[4, 16, 16]", "INFERENCE.MARGIN", "[0, 2, 2]",
    "BLOCKWISE.OUTPUT_CHUNKS", "[8, 16, 16]", "INFERENCE.MIN_SEGMENT_SIZE", "5",
]


@pytest.mark.slow
def test_infer_blockwise_equals_affinities_only_then_in_memory(tmp_path, dask_client, capsys):
    import infer

    cfg = load_cfg(None, TINY)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=1)
    raw = np.random.default_rng(0).integers(0, 256, (12, 40, 36)).astype(np.uint8)
    write_volume(f"{tmp_path / 'raw.zarr'}:em", raw, chunks=(4, 16, 16))
    common = ["--input", f"{tmp_path / 'raw.zarr'}:em", "--config", str(config), "--checkpoint", str(checkpoint)]
    blockwise = ["--blockwise", "--output", str(tmp_path / "seg.zarr"), "--block", "8", "16", "16"]
    assert infer.main([*blockwise, "--scheduler", dask_client.scheduler.address, *common]) == 0
    assert "relabel: 18 blocks in" in capsys.readouterr().out
    only = ["--affinities-only", "--output-dtype", "uint8", "--output-affinities", str(tmp_path / "a.zarr")]
    assert infer.main([*only, "--output-membranes", str(tmp_path / "f.zarr"), *common]) == 0
    affinities, foreground = open_volume(tmp_path / "a.zarr").read(), open_volume(tmp_path / "f.zarr").read()
    expected, _ = segment_affinities(affinities, build_options(cfg, block_shape=(8, 16, 16)), foreground)
    np.testing.assert_array_equal(open_volume(tmp_path / "seg.zarr").read(), expected)
    assert not any(p.name.startswith(".seg.zarr") for p in tmp_path.iterdir())  # work folders removed
