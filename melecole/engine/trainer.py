"""The one iteration-based training engine, for 1..N processes.

``Trainer.train()`` runs ``run_step`` until OPTIM.TOTAL_ITER; logging, validation, images and
checkpoints are named methods called after each step. Distributed helpers are no-ops without a
process group, so the same code runs in one CPU process, on one GPU and under DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode as CN

from melecole.engine.checkpoint import (
    check_model_compatible,
    checkpoint_cfg,
    load_checkpoint,
    load_model_weights,
    model_shape_differences,
    save_checkpoint,
    unwrap_model,
)
from melecole.engine.optim import build_optimizer, build_scheduler
from melecole.errors import CheckpointError
from melecole.utils import comm
from melecole.utils.device import configure_threads, resolve_device
from melecole.utils.files import atomic_write_text
from melecole.utils.logger import setup_logging

__all__ = ["Trainer", "make_run_dir", "seed_everything", "get_rng_state", "set_rng_state", "resume_config"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


def make_run_dir(cfg: CN) -> Path:
    """OUTPUT_PATH/<RUN_NAME>-<YYYYmmdd-HHMMSS>/ (a suffix is added if that folder exists)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.LOG.OUTPUT_PATH) / f"{cfg.LOG.RUN_NAME}-{stamp}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        run_dir = base.with_name(f"{base.name}-{suffix}")
        suffix += 1
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def resume_config(resume: str | Path, opts: list[str] | None = None) -> tuple[CN, dict]:
    """The stored config of a run (or checkpoint) to resume, with ``opts`` overrides applied.

    Model-shaping keys cannot be overridden on resume.
    """
    from melecole.config import _merge, _opts_to_dict, validate_cfg

    checkpoint = load_checkpoint(resume)
    stored = checkpoint_cfg(checkpoint)
    cfg = stored.clone()
    cfg.defrost()
    if opts:
        _merge(cfg, _opts_to_dict(list(opts)), source="command-line override")
    validate_cfg(cfg)
    differences = model_shape_differences(stored, cfg)
    if differences:
        raise CheckpointError("cannot change model-shaping keys when resuming: " + "; ".join(differences))
    cfg.freeze()
    return cfg, checkpoint


class Trainer:
    """Trains ``build_model(cfg)`` with the metric loss (and optional extra losses) on CPU or GPU.

    Args:
        cfg: frozen config.
        run_dir: folder for config.yaml, log.txt, tensorboard/ and checkpoints/; made if None.
        resume_checkpoint: a loaded checkpoint dict to continue exactly (weights, optimizer,
            scheduler, scaler, iteration, RNG); its run folder is reused when run_dir is None.
        supervised_checkpoint: path of a checkpoint whose weights initialise the model
            (model-shaping keys must match).
    """

    def __init__(
        self,
        cfg: CN,
        run_dir: str | Path | None = None,
        resume_checkpoint: dict | None = None,
        supervised_checkpoint: str | Path | None = None,
        ssl_checkpoint: str | Path | None = None,
    ) -> None:
        from melecole.data import build_train_loader, build_val_batches, check_data_root
        from melecole.losses import build_criterion
        from melecole.models import build_model

        self.cfg = cfg
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        self.is_main = self.rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device = resolve_device(cfg.HARDWARE.DEVICE, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        configure_threads(self.device, cfg.HARDWARE.NUM_THREADS, cfg.HARDWARE.NUM_WORKERS, local_processes)
        moco_pretrain = cfg.MOCO.ENABLED and cfg.MOCO.MODE == "pretrain"
        if not moco_pretrain:  # contrastive pre-training needs no labelled folder
            check_data_root(cfg, [cfg.DATASET.TRAIN_SPLIT])

        if resume_checkpoint is not None and run_dir is None:
            run_dir = Path(resume_checkpoint["path"]).resolve().parent.parent
        if self.is_main:
            if run_dir is None:
                run_dir = make_run_dir(cfg)
            run_dir = Path(run_dir)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", cfg.dump())
        if self.world_size > 1:
            # Every rank uses the folder rank 0 made (its timestamp may differ from another rank's).
            shared = [str(run_dir) if run_dir is not None else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.logger = setup_logging(self.run_dir, self.rank)

        seed_everything(cfg.SYSTEM.SEED + self.rank)
        if cfg.SYSTEM.DETERMINISTIC:
            torch.use_deterministic_algorithms(True, warn_only=True)

        model = build_model(cfg)
        if supervised_checkpoint is not None:
            checkpoint = load_checkpoint(supervised_checkpoint)
            check_model_compatible(checkpoint, cfg)
            load_model_weights(model, checkpoint)
            self.logger.info("initialised weights from %s", checkpoint["path"])
        if ssl_checkpoint is not None:
            from melecole.engine.moco_hooks import load_backbone_weights

            fresh = load_backbone_weights(model, ssl_checkpoint, cfg)
            self.logger.info("initialised the backbone from %s (fresh heads: %s)", ssl_checkpoint, len(fresh))
        self.model = self.wrap_model(model.to(self.device))
        self.criterion = build_criterion(cfg).to(self.device)
        # MoCo (MOCO.ENABLED): projection head, momentum network and queue; made after wrapping,
        # so that the momentum copy starts from the synchronised weights.
        self.moco = None
        if cfg.MOCO.ENABLED:
            from melecole.engine.moco_hooks import MoCoHook

            self.moco = MoCoHook(cfg, self.model, self.device, self.world_size)
        extra_parameters = self.moco.parameters() if self.moco is not None else []
        self.optimizer = build_optimizer(
            cfg, [p for p in self.model.parameters() if p.requires_grad] + extra_parameters
        )
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.amp = bool(cfg.HARDWARE.AMP) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0
        if resume_checkpoint is not None:
            self.load_state(resume_checkpoint)

        if self.moco is not None:
            self.train_loader = self.moco.build_loader(self.iteration, self.rank, self.world_size)
        else:
            self.train_loader = build_train_loader(
                cfg, start_iteration=self.iteration, rank=self.rank, world_size=self.world_size
            )
        validate = self.is_main and cfg.LOG.VAL_FREQUENCY > 0 and not moco_pretrain
        self.val_batches = build_val_batches(cfg, rank=0) if validate else []
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration or None)
        self.history: list[dict[str, float]] = []
        n_parameters = sum(p.numel() for p in unwrap_model(self.model).parameters())
        self.logger.info(
            "run %s | device %s | %d process(es) | %.2fM parameters | iterations %d -> %d",
            self.run_dir, self.device, self.world_size, n_parameters / 1e6, self.iteration, cfg.OPTIM.TOTAL_ITER,
        )

    # ------------------------------------------------------------------------------------------
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """SyncBatchNorm + DistributedDataParallel when running in several processes."""
        if self.world_size == 1:
            return model
        if self.cfg.MODEL.NORM == "batch":
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # SyncBatchNorm raises on CPU tensors
                self.logger.warning("SyncBatchNorm needs CUDA: on CPU each process normalises its own batch")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Without the foreground loss the foreground head gets no gradient; DDP must be told.
        unused = self.cfg.LOSS.FOREGROUND_WEIGHT == 0
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)

    def autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and loss terms for one batch (already on the device)."""
        if self.moco is not None:
            return self.moco.compute_losses(self, batch)
        with self.autocast():
            outputs = self.model(batch["raw"])
        outputs = {name: value.float() for name, value in outputs.items()}
        return self.criterion(outputs, batch["labels"])

    def run_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step; returns the loss terms as floats."""
        self.model.train()
        batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
        loss, terms = self.compute_losses(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {self.iteration}; lower OPTIM.INITIAL_LR")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.OPTIM.GRAD_CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.OPTIM.GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        scalars = {name: float(value.detach()) for name, value in terms.items()}
        scalars["loss"] = float(loss.detach())
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        return scalars

    # ------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        """Trains from the current iteration to OPTIM.TOTAL_ITER (or ``stop_at``, for tests).

        Returns the per-iteration scalars. Ctrl-C saves ``last.pt`` before leaving.
        """
        end = self.cfg.OPTIM.TOTAL_ITER if stop_at is None else min(stop_at, self.cfg.OPTIM.TOTAL_ITER)
        progress = None
        if self.is_main and self.cfg.LOG.PROGRESS_BAR:
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.iteration, desc="train", dynamic_ncols=True, leave=False)
        loader = iter(self.train_loader)
        start_time, start_iteration = time.perf_counter(), self.iteration
        try:
            while self.iteration < end:
                batch = next(loader)
                scalars = self.run_step(batch)
                self.iteration += 1
                self.history.append(scalars)
                self.after_step(scalars, progress)
        except KeyboardInterrupt:
            if self.is_main:
                self.logger.warning("interrupted at iteration %d; saving last.pt", self.iteration)
                self.save_checkpoint(final=False)
            raise
        finally:
            if progress is not None:
                progress.close()
        elapsed = time.perf_counter() - start_time
        if self.iteration > start_iteration:
            self.logger.info(
                "trained %d iterations in %.1f s (%.2f it/s)",
                self.iteration - start_iteration, elapsed, (self.iteration - start_iteration) / max(elapsed, 1e-9),
            )
        if self.is_main and self.iteration == self.cfg.OPTIM.TOTAL_ITER:
            self.save_checkpoint(final=True)
        if self.writer is not None:
            self.writer.flush()
        return self.history

    def after_step(self, scalars: dict[str, float], progress: Any) -> None:
        log = self.cfg.LOG
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}")
        if not self.is_main:
            return
        if self.iteration % log.LOG_FREQUENCY == 0 or self.iteration == 1:
            self.log_scalars(scalars)
        if log.VAL_FREQUENCY > 0 and self.iteration % log.VAL_FREQUENCY == 0:
            self.validate()
        if log.IMAGE_FREQUENCY > 0 and self.iteration % log.IMAGE_FREQUENCY == 0:
            self.log_images()
        if log.CHECKPOINT_FREQUENCY > 0 and self.iteration % log.CHECKPOINT_FREQUENCY == 0:
            self.save_checkpoint(final=False)

    def log_scalars(self, scalars: dict[str, float]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, self.iteration)
        self.writer.add_scalar("train/lr", lr, self.iteration)
        terms = " ".join(f"{name} {value:.4f}" for name, value in scalars.items())
        self.logger.info("iter %d/%d | %s | lr %.2e", self.iteration, self.cfg.OPTIM.TOTAL_ITER, terms, lr)

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Mean loss terms over the fixed validation patches (rank 0)."""
        if not self.val_batches:
            return None
        self.model.eval()
        model = unwrap_model(self.model)
        sums: dict[str, float] = {}
        for batch in self.val_batches:
            batch = {name: value.to(self.device) for name, value in batch.items()}
            with self.autocast():
                outputs = model(batch["raw"])
            loss, terms = self.criterion({k: v.float() for k, v in outputs.items()}, batch["labels"])
            for name, value in {**terms, "loss": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        means = {name: value / len(self.val_batches) for name, value in sums.items()}
        for name, value in means.items():
            self.writer.add_scalar(f"val/{name}", value, self.iteration)
        self.logger.info("val iter %d | %s", self.iteration, " ".join(f"{k} {v:.4f}" for k, v in means.items()))
        return means

    @torch.no_grad()
    def log_images(self) -> None:
        """Raw, labels and the first 3 principal components of the embedding (middle section)."""
        if not self.val_batches:
            return
        from melecole.utils.images import embedding_pca_image, label_image

        batch = self.val_batches[0]
        model = unwrap_model(self.model)
        model.eval()
        raw = batch["raw"][:1].to(self.device)
        with self.autocast():
            embedding = model(raw)["embedding"][0].float().cpu()
        middle = embedding.shape[1] // 2
        self.writer.add_image("val/raw", batch["raw"][0, :, middle], self.iteration)
        self.writer.add_image("val/labels", label_image(batch["labels"][0, middle].numpy()), self.iteration,
                              dataformats="HWC")
        self.writer.add_image("val/embedding_pca", embedding_pca_image(embedding[:, middle]), self.iteration,
                              dataformats="HWC")

    # ------------------------------------------------------------------------------------------
    def state_extra(self) -> dict:
        """Extra entries for the checkpoint (e.g. a MoCo queue lives in the model's buffers)."""
        extra = {"mean_loss_recent": _mean([h["loss"] for h in self.history[-50:]])}
        if self.moco is not None:
            extra["moco"] = self.moco.state_dict()
        return extra

    def save_checkpoint(self, final: bool) -> Path:
        """checkpoints/iter_<N>.pt and checkpoints/last.pt, both written atomically."""
        folder = self.run_dir / "checkpoints"
        options = dict(
            model=self.model, cfg=self.cfg, iteration=self.iteration, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, rng_state=get_rng_state(), extra=self.state_extra(),
        )
        path = folder / f"iter_{self.iteration}.pt"
        save_checkpoint(path, **options)
        save_checkpoint(folder / "last.pt", **options)
        self.logger.info("saved checkpoint %s%s", path, " (final)" if final else "")
        return path

    def load_state(self, checkpoint: dict) -> None:
        """Continues a run exactly: weights, optimizer, scheduler, scaler, iteration, RNG."""
        check_model_compatible(checkpoint, self.cfg)
        load_model_weights(self.model, checkpoint)
        try:
            if checkpoint.get("optimizer") is not None:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scheduler") is not None:
                self.scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint.get("scaler") is not None:
                self.scaler.load_state_dict(checkpoint["scaler"])
        except (ValueError, KeyError) as error:
            source = checkpoint["path"]
            raise CheckpointError(f"checkpoint '{source}': cannot restore optimizer state ({error})") from None
        if self.moco is not None:
            self.moco.load_state_dict(checkpoint.get("moco"), source=f"checkpoint '{checkpoint['path']}'")
        self.iteration = int(checkpoint["iteration"])
        rng = checkpoint.get("rng")
        set_rng_state(rng)
        self.logger.info("resumed %s at iteration %d", checkpoint["path"], self.iteration)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan

