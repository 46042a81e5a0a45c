"""Dense MoCo: view correspondence, queue, momentum update, InfoNCE, training, resume, DDP."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melecole.config import load_cfg
from melecole.data.views import SpatialTransform, TwoViewDataset, sample_view_pair
from melecole.data.volume import read_volume
from melecole.engine.checkpoint import HEAD_PREFIXES, load_checkpoint, unwrap_model
from melecole.engine.trainer import Trainer, resume_config
from melecole.errors import ConfigError
from melecole.models import UNet3D
from melecole.models.moco import DenseMoCo, gather_voxels, info_nce, key_std, supervised_info_nce
from melecole.testing import write_box_volume as write_volume


def tiny_encoder() -> UNet3D:
    return UNet3D(filters=(4, 8), pool_z=(False,), embedding_dim=4, norm="group", norm_groups=2)


def tiny_opts(tmp_path: Path, **extra: str) -> list[str]:
    """A tiny MoCo run: one labelled train volume, one val volume, two unlabelled volumes."""
    for split, seed in (("train", 0), ("val", 1)):
        write_volume(tmp_path / "data" / split / f"{split}.hdf", seed=seed)
    for seed in (2, 3):
        write_volume(tmp_path / "unlabeled" / f"u{seed}.h5", seed=seed, labels=False)
    opts = {
        "DATASET.DATA_ROOT": str(tmp_path / "data"),
        "DATASET.UNLABELED_DATA_ROOT": str(tmp_path / "unlabeled"),
        "MODEL.INPUT_SIZE": "[8, 32, 32]",
        "MODEL.FILTERS": "[4, 8]",
        "MODEL.POOL_Z": "[False]",
        "MODEL.NORM_GROUPS": "2",
        "MODEL.EMBEDDING_DIMENSION": "4",
        "MOCO.ENABLED": "True",
        "MOCO.QUEUE_SIZE": "40",
        "MOCO.NUM_SAMPLES": "8",
        "MOCO.PROJECTION_DIM": "8",
        "MOCO.PROJECTION_HIDDEN": "8",
        "MOCO.MOMENTUM": "0.9",
        "MOCO.MAX_SHIFT": "[2, 8, 8]",
        "OPTIM.TOTAL_ITER": "4",
        "OPTIM.BATCH_SIZE": "2",
        "HARDWARE.NUM_WORKERS": "0",
        "HARDWARE.DEVICE": "cpu",
        "LOG.OUTPUT_PATH": str(tmp_path / "runs"),
        "LOG.CHECKPOINT_FREQUENCY": "2",
        "LOG.VAL_FREQUENCY": "0",
        "LOG.IMAGE_FREQUENCY": "0",
        "LOG.LOG_FREQUENCY": "1",
        "LOG.PROGRESS_BAR": "False",
        "AUGMENTATION.ELASTIC.P": "0.0",
    }
    opts.update(extra)
    return [item for pair in opts.items() for item in pair]


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6, 6), (3, 5, 7)])
def test_every_spatial_transform_maps_coordinates_exactly(shape):
    array = np.arange(np.prod(shape)).reshape(shape)
    coords = np.stack(np.unravel_index(np.arange(array.size), shape), axis=1)
    square = shape[1] == shape[2]
    for flips in itertools.product([False, True], repeat=3):
        for transpose in ([False, True] if square else [False]):
            for rotations in (range(4) if square else (0, 2)):
                transform = SpatialTransform(flips, transpose, rotations)
                moved = transform.apply(array)
                assert moved.shape == array.shape
                mapped = transform.map_coords(coords, shape)
                np.testing.assert_array_equal(moved[tuple(mapped.T)], array[tuple(coords.T)])


@pytest.mark.parametrize("seed", range(6))
def test_view_pairs_correspond_exactly_without_intensity_augmentation(seed):
    rng = np.random.default_rng(seed)
    region = rng.permutation(10 * 24 * 24).reshape(10, 24, 24).astype(np.float32)  # unique values
    labels = (np.arange(region.size).reshape(region.shape) // 7).astype(np.int64)
    pair = sample_view_pair(region, (8, 16, 16), 200, rng, labels=labels, spatial=True, augmentor=None)
    expected = region[tuple(pair["locations"].T)]
    np.testing.assert_array_equal(pair["view1"][tuple(pair["coords1"].T)], expected)
    np.testing.assert_array_equal(pair["view2"][tuple(pair["coords2"].T)], expected)
    np.testing.assert_array_equal(pair["labels"], labels[tuple(pair["locations"].T)])
    assert pair["view1"].shape == pair["view2"].shape == (8, 16, 16)


def test_view_batches_are_exact_through_volume_padding_and_deterministic(tmp_path):
    path = tmp_path / "v.hdf"
    write_volume(path, shape=(12, 40, 40))
    volume = read_volume(path)
    dataset = TwoViewDataset([volume], size=(8, 16, 16), max_shift=(3, 6, 6), num_samples=32, batch_size=2,
                             augmentor=None, seed=5)
    batch = dataset.make_batch(3)
    assert batch["view1"].shape == (2, 1, 8, 16, 16) and batch["coords1"].shape == (2, 32, 3)
    for crop in range(2):
        values1 = batch["view1"][crop, 0][tuple(batch["coords1"][crop].T)]
        values2 = batch["view2"][crop, 0][tuple(batch["coords2"][crop].T)]
        torch.testing.assert_close(values1, values2, rtol=0, atol=0)
    groups = batch["view_groups"]
    assert (groups > 0).any() and (groups < 0).any()  # labelled voxels and membranes
    again = dataset.make_batch(3)
    for name in batch:
        torch.testing.assert_close(batch[name], again[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Module pieces
# ------------------------------------------------------------------------------------------------


def test_gather_voxels_picks_feature_vectors():
    volume = torch.randn(2, 3, 4, 5, 6)
    coords = torch.tensor([[[0, 0, 0], [3, 4, 5]], [[1, 2, 3], [2, 0, 5]]])
    picked = gather_voxels(volume, coords)
    expected = torch.stack([volume[b, :, z, y, x] for b in range(2) for z, y, x in coords[b].tolist()])
    torch.testing.assert_close(picked, expected)


def test_queue_and_pointer_advance_and_wrap():
    moco = DenseMoCo(tiny_encoder(), feature_channels=4, projection_dim=3, projection_hidden=0, queue_size=5)
    assert int(moco.queue_ptr) == 0 and moco.queue.shape == (5, 3)
    keys1 = torch.arange(9.0).reshape(3, 3)
    moco.dequeue_and_enqueue(keys1)
    assert int(moco.queue_ptr) == 3
    torch.testing.assert_close(moco.queue[:3], keys1)
    keys2 = 100 + torch.arange(9.0).reshape(3, 3)
    moco.dequeue_and_enqueue(keys2)
    assert int(moco.queue_ptr) == 1  # 3 + 3 wraps around 5
    torch.testing.assert_close(moco.queue[3:5], keys2[:2])
    torch.testing.assert_close(moco.queue[0], keys2[2])
    torch.testing.assert_close(moco.queue[1:3], keys1[1:3])  # untouched
    keys3 = torch.arange(21.0).reshape(7, 3)  # more keys than slots: the newest 5 are kept
    moco.dequeue_and_enqueue(keys3)
    assert int(moco.queue_ptr) == 1 and int(moco.queue_filled) == 5
    torch.testing.assert_close(moco.queue[torch.tensor([1, 2, 3, 4, 0])], keys3[2:])
    assert "queue" in moco.state_dict() and "queue_ptr" in moco.state_dict()


def test_momentum_update_equals_ema_formula():
    encoder = tiny_encoder()
    moco = DenseMoCo(encoder, feature_channels=4, projection_dim=3, projection_hidden=5, momentum=0.75)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in list(encoder.parameters()) + list(moco.projection.parameters()):
            parameter.add_(torch.randn_like(parameter))
    before = [p.clone() for p in moco.momentum_parameters()]
    online = list(encoder.parameters()) + list(moco.projection.parameters())
    moco.momentum_update(encoder)
    for old, new, current in zip(before, moco.momentum_parameters(), online):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * current)
        assert not new.requires_grad
    assert all(p.requires_grad for p in moco.trainable_parameters())


def test_info_nce_matches_plain_reference():
    torch.manual_seed(0)
    query, key, queue = (F.normalize(torch.randn(n, 4), dim=1) for n in (5, 5, 7))
    loss, logits = info_nce(query, key, queue, temperature=0.2)
    reference = 0.0
    for i in range(5):
        positive = math.exp(float(query[i] @ key[i]) / 0.2)
        negatives = sum(math.exp(float(query[i] @ queue[j]) / 0.2) for j in range(7))
        reference += -math.log(positive / (positive + negatives))
    assert loss.item() == pytest.approx(reference / 5, rel=1e-6)
    assert logits.shape == (5, 8)


def test_supervised_info_nce_matches_plain_reference():
    torch.manual_seed(0)
    query, key, queue = (F.normalize(torch.randn(n, 4), dim=1) for n in (6, 6, 5))
    groups = torch.tensor([3, 3, -1, 7, 7, 7])
    loss, _ = supervised_info_nce(query, key, groups, queue, temperature=0.5)
    reference = 0.0
    for i in range(6):
        candidates = list(key) + list(queue)
        scores = [float(query[i] @ candidate) / 0.5 for candidate in candidates]
        log_normaliser = math.log(sum(math.exp(s) for s in scores))
        positives = [j for j in range(6) if groups[j] == groups[i]]
        reference += -sum(scores[j] - log_normaliser for j in positives) / len(positives)
    assert loss.item() == pytest.approx(reference / 6, rel=1e-6)


def test_key_std_flags_collapse():
    torch.manual_seed(0)
    spread = F.normalize(torch.randn(4000, 16), dim=1)
    assert key_std(spread).item() == pytest.approx(1 / math.sqrt(16), rel=0.05)
    collapsed = F.normalize(torch.ones(100, 16), dim=1)
    assert key_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_gives_gradients_to_online_network_only():
    encoder = tiny_encoder()
    moco = DenseMoCo(encoder, feature_channels=4, projection_dim=8, projection_hidden=8, queue_size=32)
    view = torch.rand(2, 1, 8, 16, 16)
    coords = torch.randint(0, 8, (2, 6, 3))
    moco.momentum_update(encoder)
    loss, terms = moco(encoder.forward_features(view), view.clone(), coords, coords.clone())
    loss.backward()
    assert torch.isfinite(loss) and int(moco.queue_ptr) == 12
    assert encoder.stem[0].weight.grad is not None and encoder.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moco.momentum_parameters())
    assert set(terms) >= {"moco_accuracy", "moco_key_std", "moco_key_std_ratio"}


def test_batch_norm_is_rejected(tmp_path):
    opts = tiny_opts(tmp_path, **{"MODEL.NORM": "batch"})
    with pytest.raises(ConfigError, match="MODEL.NORM"):  # refused when the config is read
        Trainer(load_cfg(None, opts))


# ------------------------------------------------------------------------------------------------
# Training through the engine
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("supervised", [False, True])
def test_joint_training_runs_in_one_process(tmp_path, supervised):
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"MOCO.SUPERVISED": str(supervised)}))
    trainer = Trainer(cfg)
    history = trainer.train(keep_history=True)
    assert len(history) == 4
    for scalars in history:
        assert math.isfinite(scalars["loss"]) and math.isfinite(scalars["moco_infonce"])
        assert "metric_loss" in scalars and 0.0 <= scalars["moco_key_std_ratio"] <= 2.0
    assert int(trainer.objective.moco.queue_ptr) == (4 * 2 * 8) % 40
    assert trainer.objective.moco.queue_filled.item() == 40
    checkpoint = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert "moco" in checkpoint and "queue" in checkpoint["moco"]


@pytest.mark.slow
def test_pretrain_then_finetune_from_ssl_checkpoint(tmp_path):
    from melecole.train import main

    # Pre-training reads only the unlabelled folder: no labelled data at all.
    opts = tiny_opts(tmp_path, **{"MOCO.MODE": "pretrain", "DATASET.DATA_ROOT": str(tmp_path / "absent"),
                                  "LOG.RUN_NAME": "pretrain"})
    cfg = load_cfg(None, opts)
    pretrain = Trainer(cfg)
    history = pretrain.train(keep_history=True)
    assert all("metric_loss" not in h and math.isfinite(h["moco_infonce"]) for h in history)
    ssl = pretrain.run_dir / "checkpoints" / "last.pt"
    pretrained = load_checkpoint(ssl)["model"]

    finetune_opts = tiny_opts(tmp_path, **{"MOCO.ENABLED": "False", "OPTIM.TOTAL_ITER": "1",
                                           "OPTIM.INITIAL_LR": "1e-12", "LOG.RUN_NAME": "finetune",
                                           "SYSTEM.SEED": "1"})
    config = tmp_path / "finetune.yaml"
    config.write_text("MOCO:\n  ENABLED: false\n")
    assert main(["--config", str(config), "--ssl_checkpoint", str(ssl), *finetune_opts]) == 0
    run = next((tmp_path / "runs").glob("finetune-*"))
    finetuned = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for name, value in pretrained.items():
        if name.startswith(HEAD_PREFIXES):
            if name.endswith("weight"):  # fresh heads (biases start at 0 either way)
                assert not torch.allclose(finetuned[name], value)
        elif value.is_floating_point():
            torch.testing.assert_close(finetuned[name], value, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_resume_restores_queue_pointer_and_momentum_encoder(tmp_path):
    cfg = load_cfg(None, tiny_opts(tmp_path))
    straight = Trainer(cfg)
    straight.train()
    final_state = {k: v.clone() for k, v in straight.objective.moco.state_dict().items()}

    checkpoint_path = straight.run_dir / "checkpoints" / "iter_2.pt"
    saved = load_checkpoint(checkpoint_path)["moco"]
    resumed_cfg, checkpoint = resume_config(checkpoint_path)
    resumed = Trainer(resumed_cfg, run_dir=tmp_path / "resumed", resume_checkpoint=checkpoint)
    # Right after loading: queue, pointer, momentum network and projection heads are the saved ones.
    assert resumed.iteration == 2
    for name, value in saved.items():
        torch.testing.assert_close(resumed.objective.moco.state_dict()[name], value, rtol=0, atol=0)
    assert int(resumed.objective.moco.queue_ptr) == (2 * 2 * 8) % 40
    # ... and continuing gives the same final state as the uninterrupted run.
    resumed.train()
    for name, value in final_state.items():
        torch.testing.assert_close(resumed.objective.moco.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def _ddp_worker(argument: tuple[list[str], str]) -> None:
    """One rank of a 2-process gloo MoCo run: train, then save this rank's MoCo state."""
    opts, output = argument
    trainer = Trainer(load_cfg(None, opts))
    history = trainer.train(keep_history=True)
    assert all(math.isfinite(h["loss"]) for h in history)
    state = {name: value.clone() for name, value in trainer.objective.moco.state_dict().items()}
    state["online.stem"] = unwrap_model(trainer.model).stem[0].weight.detach().clone()
    torch.save(state, f"{output}.rank{trainer.rank}")


@pytest.mark.slow
def test_two_process_gloo_run_keeps_queue_and_momentum_encoder_in_sync(tmp_path):
    from melecole.engine import launch as distributed

    opts = tiny_opts(tmp_path, **{"MOCO.SUPERVISED": "True", "OPTIM.TOTAL_ITER": "3"})
    output = tmp_path / "moco_state.pt"
    distributed.launch(_ddp_worker, (opts, str(output)), world_size=2, backend="gloo")
    states = [torch.load(f"{output}.rank{rank}") for rank in range(2)]
    # Keys of both ranks are gathered: 3 steps x 2 ranks x 2 crops x 8 voxels, modulo the queue.
    assert int(states[0]["queue_ptr"]) == (3 * 2 * 2 * 8) % 40
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=1e-6, msg=name)


def load_moco_bench(repo_root: Path):
    """bench/bench_moco_label_efficiency.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_moco", repo_root / "bench" / "bench_moco_label_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_label_efficiency_bench_runs_end_to_end(tmp_path, repo_root):
    bench = load_moco_bench(repo_root)
    assert bench.main([
        "--out", str(tmp_path / "bench"), "--seeds", "0", "--iterations", "2", "--threads", "1",
        "--labelled-shape", "16", "64", "64", "--volume-shape", "16", "64", "64", "--unlabelled", "1",
        "MODEL.FILTERS", "[4, 8, 16]", "MODEL.NORM_GROUPS", "2", "MOCO.NUM_SAMPLES", "16", "MOCO.QUEUE_SIZE", "64",
    ]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "bench").glob("seed0/*/record.json")]
    assert {r["arm"] for r in records} == {"supervised", "pretrain+finetune", "joint"}
    assert all(math.isfinite(r["vi_total"]) and 0.0 <= r["arand"] <= 1.0 for r in records)
    assert {r["arm"]: r["steps"] for r in records}["pretrain+finetune"] == {"pretrain": 1, "finetune": 1}


def test_label_efficiency_bench_equal_time_budget(tmp_path, repo_root):
    """--minutes turns the measured seconds per step of each mode into step counts of equal CPU time."""
    bench = load_moco_bench(repo_root)
    args = argparse.Namespace(minutes=2.0, pretrain_fraction=0.25, iterations=0)
    steps = bench.budget_steps(args, {"supervised": 0.5, "joint": 1.5, "pretrain": 1.0})
    assert steps == {"supervised": 240, "joint": 80, "pretrain": 30, "finetune": 180}
    args = argparse.Namespace(minutes=0.0, pretrain_fraction=0.5, iterations=9)
    assert bench.budget_steps(args, None) == {"supervised": 9, "joint": 9, "pretrain": 4, "finetune": 5}


def test_label_efficiency_bench_medulla_keeps_only_the_first_sections(tmp_path, repo_root):
    if not (repo_root.parent / "shared" / "data" / "medulla" / "train").is_dir():
        pytest.skip("../shared/data/medulla is absent")
    bench = load_moco_bench(repo_root)
    options = bench.make_medulla(tmp_path, 5)
    train = tmp_path / "train" / "medulla_train_first5.hdf"
    with h5py.File(train, "r") as cut, h5py.File(bench.MEDULLA / "train" / "medulla_train.hdf", "r") as full:
        np.testing.assert_array_equal(cut["labels"][:], full["labels"][:5])
        np.testing.assert_array_equal(cut["volume"][:], full["volume"][:5])
    assert options == {"DATASET.DATA_ROOT": tmp_path}
    assert (tmp_path / "val" / "medulla_val.hdf").resolve() == (bench.MEDULLA / "val" / "medulla_val.hdf").resolve()
    with pytest.raises(SystemExit, match="--labelled-sections: expected 1-100, got 101"):
        bench.make_medulla(tmp_path / "other", 101)


def test_gradient_clipping_covers_the_projection_head(tmp_path):
    """OPTIM.GRAD_CLIP clips everything the optimizer updates (network + MoCo projection head)."""
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.GRAD_CLIP": "0.001"}))
    trainer = Trainer(cfg)
    scalars = trainer.run_step(next(iter(trainer.train_loader)))
    projection = trainer.objective.moco.projection.parameters()
    projection_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in projection))
    total_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.optimized_parameters if p.grad is not None))
    assert projection_norm > 0 and scalars["grad_norm"] > 0.001
    assert total_norm.item() == pytest.approx(0.001, rel=1e-4)  # the projection head was clipped too
    optimized = {id(p) for p in trainer.optimized_parameters}
    assert {id(p) for p in trainer.objective.moco.projection.parameters()} <= optimized
