"""The fast paths of the blockwise runs: torch threads of ``infer.py --blockwise``'s prediction workers,
and the reads of infer.py's stored HDF5 outputs (behaviour only; speed is measured by bench/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melecole.blockwise import predict
from melecole.config import load_cfg
from melecole.engine.checkpoint import save_checkpoint
from melecole.io import write_volume
from melecole.models import build_model

TINY = [
    "MODEL.INPUT_SIZE", "[8, 32, 32]", "MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]",
    "MODEL.EMBEDDING_DIMENSION", "4", "HARDWARE.DEVICE", "cpu", "LOG.PROGRESS_BAR", "False",
    "INFERENCE.WINDOW_SIZE", "[4, 16, 16]", "INFERENCE.MARGIN", "[0, 2, 2]", "INFERENCE.BACKEND", "torch",
]  # fmt: skip


def _predict_then_threads(job: predict.PredictionJob, index: int) -> int:
    """Runs the real prediction task of block ``index``, then reports torch's threads as the task's thread
    sees them."""
    import torch

    predict.predict_task(job, index)
    return torch.get_num_threads()


def _threads(threads: int) -> int:
    return predict.worker_threads(threads)


def test_default_threads_share_the_usable_cores_out(monkeypatch):
    monkeypatch.setattr("melecole.utils.device.usable_cpu_count", lambda: 8)
    assert [predict.default_threads(w) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_worker_threads_sets_and_reports_torch_threads():
    before = torch.get_num_threads()
    try:
        assert predict.worker_threads(0) == before  # 0: left as it is
        assert predict.worker_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_prediction_workers_run_the_planned_torch_threads(tmp_path, monkeypatch, dask_client):
    """Planned as infer.py --blockwise plans 2 LocalCluster workers on a machine with 2 x (cores + 1)
    cores (a count no worker has by default): each of the 2 worker processes predicts on that share."""
    import os

    cfg = load_cfg(None, TINY)
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=1)
    raw = np.random.default_rng(0).integers(0, 256, (8, 16, 32)).astype(np.uint8)
    write_volume(f"{tmp_path / 'raw.zarr'}:em", raw, chunks=(8, 16, 16))
    planned = (os.cpu_count() or 1) + 1
    monkeypatch.setattr("melecole.utils.device.usable_cpu_count", lambda: 2 * planned)
    job = predict.plan_prediction(
        cfg,
        str(checkpoint),
        f"{tmp_path / 'raw.zarr'}:em",
        None,
        tmp_path / "pred",
        predict.default_threads(2),
        (8, 16, 16),
    )
    assert job.threads == planned and job.plan.num_blocks == 2
    predict.prepare_prediction(job, resume=False)
    workers = sorted(dask_client.scheduler_info()["workers"])
    assert len(workers) == 2
    before = [dask_client.submit(_threads, 0, workers=[w], pure=False).result() for w in workers]
    try:
        seen = [
            dask_client.submit(_predict_then_threads, job, index, workers=[w], pure=False).result()
            for index, w in enumerate(workers)
        ]
    finally:  # the cluster is shared by the other tests: give the workers their own count back
        for w, count in zip(workers, before):
            dask_client.submit(_threads, count, workers=[w], pure=False).result()
    assert planned not in before
    assert seen == [planned, planned]
    assert sorted(p.name for p in (tmp_path / "pred" / "done" / "predict").iterdir()) == ["0", "1"]


@pytest.mark.parametrize("fragments", ["mws", "watershed"])
def test_float16_hdf5_from_infer_gives_the_labels_of_its_values(tmp_path, tiny_volume, blockwise_cfg, fragments):
    """infer.py's float16 HDF5 affinities (its own writer): the blockwise run reads them as float32 and
    gives exactly the labels of the in-memory algorithm on the stored float16 values."""
    from melecole.blockwise.plan import build_options
    from melecole.blockwise.runner import SerialExecutor, segment_blockwise
    from melecole.blockwise.segment import segment_blockwise_in_memory
    from melecole.inference.outputs import write_hdf
    from melecole.io import open_volume

    stored = tiny_volume["affinities"].astype(np.float16)
    path = tmp_path / "val_affinities.hdf"
    write_hdf(path, {"affinities": (stored, {})}, {})
    options = build_options(blockwise_cfg, fragments=fragments)
    segment_blockwise(
        f"{path}:affinities", str(tmp_path / "seg.zarr"), options, executor=SerialExecutor(), progress=False,
        report=lambda line: None,
    )  # fmt: skip
    expected, _ = segment_blockwise_in_memory(stored, options)
    np.testing.assert_array_equal(open_volume(tmp_path / "seg.zarr").read(), expected)
    assert len(np.unique(expected)) > 5


def test_float16_block_reads_as_float32_and_is_still_checked(tmp_path, tiny_volume, blockwise_cfg):
    from melecole.blockwise.plan import build_options
    from melecole.blockwise.tasks import BlockwiseJob, _read_inputs
    from melecole.errors import DataError
    from melecole.inference.outputs import write_hdf

    stored = tiny_volume["affinities"].astype(np.float16)
    write_hdf(tmp_path / "a.hdf", {"affinities": (stored, {})}, {})
    options = build_options(blockwise_cfg)
    job = BlockwiseJob(f"{tmp_path / 'a.hdf'}:affinities", None, str(tmp_path / "work"), stored.shape[1:], options)
    outer, _ = job.plan.padded(1, options.halo)
    values, _ = _read_inputs(job, 1, outer)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, stored[(slice(None),) + outer].astype(np.float32))
    stored[2, 3, 5, 20] = np.nan
    write_hdf(tmp_path / "b.hdf", {"affinities": (stored, {})}, {})
    job = BlockwiseJob(f"{tmp_path / 'b.hdf'}:affinities", None, str(tmp_path / "work"), stored.shape[1:], options)
    with pytest.raises(DataError, match=r"b.hdf:affinities: block 1 .* 1 bad value \(1 NaN, 0 Inf, 0 outside"):
        _read_inputs(job, 1, job.plan.padded(1, options.halo)[0])
