"""infer.py --blockwise: one dask run of chunked prediction (block tasks on the workers) and the
blockwise segmentation; resume of an interrupted prediction; errors before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melecole.blockwise.plan import build_options
from melecole.blockwise.segment import segment_blockwise_in_memory
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


def tiny_setup(tmp_path) -> tuple:
    """(cfg, common infer.py arguments, --blockwise arguments) for a random tiny model and raw."""
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
    return cfg, common, blockwise + ["--chunk", "8", "16", "16"]


@pytest.mark.slow
def test_infer_blockwise_equals_affinities_only_then_in_memory(tmp_path, dask_client, capsys):
    import infer

    cfg, common, blockwise = tiny_setup(tmp_path)
    assert infer.main([*blockwise, "--scheduler", dask_client.scheduler.address, *common]) == 0
    out = capsys.readouterr().out
    # One run: the prediction is a pass of block tasks on the cluster, before the segmentation passes.
    passes = [line.split(":")[0] for line in out.splitlines() if " blocks in " in line]
    assert passes == ["predict", "fragments", "graph", "agglomerate", "relabel"]
    assert "relabel: 18 blocks in" in out
    only = ["--affinities-only", "--output-dtype", "uint8", "--output-affinities", str(tmp_path / "a.zarr")]
    assert infer.main([*only, "--output-membranes", str(tmp_path / "f.zarr"), *common]) == 0
    affinities, foreground = open_volume(tmp_path / "a.zarr").read(), open_volume(tmp_path / "f.zarr").read()
    expected, _ = segment_blockwise_in_memory(affinities, build_options(cfg, block_shape=(8, 16, 16)), foreground)
    np.testing.assert_array_equal(open_volume(tmp_path / "seg.zarr").read(), expected)
    assert not any(p.name.startswith(".seg.zarr") for p in tmp_path.iterdir())  # work folders removed


@pytest.mark.slow
def test_interrupted_prediction_resumes_and_gives_the_same_result(tmp_path, dask_client, capsys):
    import infer
    from melecole.blockwise.orchestrate import _prediction_folder
    from melecole.blockwise.predict import plan_prediction, predict_task, prepare_prediction

    cfg, common, blockwise = tiny_setup(tmp_path)
    scheduler = ["--scheduler", dask_client.scheduler.address]
    assert infer.main([*blockwise, *scheduler, *common]) == 0
    expected = open_volume(tmp_path / "seg.zarr").read()
    # A run killed during its prediction: two of its blocks finished (marker written), no output yet.
    output = tmp_path / "seg2.zarr"
    folder = _prediction_folder(str(output))
    job = plan_prediction(cfg, common[5], common[1], None, folder, 1, chunk=(8, 16, 16))
    assert prepare_prediction(job, resume=False) == 0
    for index in (0, 2):
        predict_task(job, index)
    total = job.plan.num_blocks
    capsys.readouterr()
    second = ["--blockwise", "--output", str(output), "--block", "8", "16", "16", "--chunk", "8", "16", "16"]
    assert infer.main([*second, *scheduler, "--resume", *common]) == 0
    out = capsys.readouterr().out
    assert f"predict: resuming, 2 of {total} blocks already done" in out
    assert f"predict: {total - 2} blocks in" in out
    np.testing.assert_array_equal(open_volume(output).read(), expected)
    assert not folder.exists()


def test_resume_with_another_checkpoint_is_refused(tmp_path, capsys):
    from melecole.blockwise.orchestrate import _prediction_folder
    from melecole.blockwise.predict import plan_prediction, prepare_prediction

    cfg, common, blockwise = tiny_setup(tmp_path)
    job = plan_prediction(cfg, common[5], common[1], None, _prediction_folder(blockwise[2]), threads=1)
    prepare_prediction(job, resume=False)
    save_checkpoint(common[5], model=build_model(cfg), cfg=cfg, iteration=2)  # the checkpoint changed since
    with pytest.raises(Exception, match="interrupted prediction used another checkpoint"):
        prepare_prediction(plan_prediction(cfg, common[5], common[1], None, job.path, threads=1), resume=True)
    assert (job.path / "manifest.json").is_file()  # refused: nothing removed


def test_existing_output_is_refused_before_any_prediction(tmp_path, capsys):
    import infer

    _, common, blockwise = tiny_setup(tmp_path)
    write_volume(tmp_path / "seg.zarr", np.zeros((12, 40, 36), np.uint64))
    code = infer.main([*blockwise, "--workers", "1", *common])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "already exists, expected --resume or --overwrite" in err
    assert not any(p.name.endswith(".predicted") for p in tmp_path.iterdir())  # nothing was predicted


def test_blockwise_refuses_flags_of_other_modes(tmp_path, capsys):
    import infer

    _, common, blockwise = tiny_setup(tmp_path)
    for extra, named in ((["--output-affinities", str(tmp_path / "a.zarr")], "--output-affinities"),
                         (["--thresholds", "0.5"], "--thresholds"), (["--affinities-only"], "--affinities-only")):
        code = infer.main([*blockwise, *extra, *common])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert "--blockwise writes --output only" in err and named in err


def test_output_over_the_raw_input_is_refused_and_nothing_is_touched(tmp_path, capsys):
    from test_blockwise_output_safety import tree_hash

    import infer

    _, common, blockwise = tiny_setup(tmp_path)
    before = tree_hash(tmp_path)
    # (raw.zarr:seg, a sibling of the raw array in its group, is allowed: it overlaps no input.)
    for output in (tmp_path / "raw.zarr", tmp_path / "raw.zarr" / "em", tmp_path / "raw.zarr" / "em" / "s.zarr"):
        blockwise[2] = str(output)
        code = infer.main([*blockwise, "--overwrite", "--workers", "1", *common])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert "the input --input" in err
        assert tree_hash(tmp_path) == before


def test_interrupted_prediction_without_resume_is_refused(tmp_path, capsys):
    import infer
    from melecole.blockwise.orchestrate import _prediction_folder
    from melecole.blockwise.predict import plan_prediction, prepare_prediction

    cfg, common, blockwise = tiny_setup(tmp_path)
    job = plan_prediction(cfg, common[5], common[1], None, _prediction_folder(blockwise[2]), threads=1)
    prepare_prediction(job, resume=False)
    code = infer.main([*blockwise, "--workers", "1", *common])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "an interrupted prediction of this output, expected --resume" in err
    assert (job.path / "manifest.json").is_file()
