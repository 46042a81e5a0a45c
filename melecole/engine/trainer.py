"""The one iteration-based training engine, for 1..N processes.

``Trainer.train()`` runs ``run_step`` until OPTIM.TOTAL_ITER; logging, validation, images and
checkpoints are named methods called after each step. The loss comes from an objective
(:mod:`melecole.losses.objectives`: metric, or metric + contrastive), which owns its own state.
Distributed helpers are no-ops without a process group, so the same code runs in one CPU process,
on one GPU and under DDP.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode as CN

from melecole.config import apply_overrides
from melecole.engine.checkpoint import (
    check_model_compatible,
    checkpoint_cfg,
    load_backbone_weights,
    load_checkpoint,
    load_fine_tuning_weights,
    load_model_weights,
    model_shape_differences,
    save_checkpoint,
    unwrap_model,
)
from melecole.engine.launch import interrupt_between_steps
from melecole.engine.loaders import build_training_loader
from melecole.engine.optim import build_optimizer, build_scheduler
from melecole.engine.run_folder import (
    RUN_MARKER,
    adopt_or_refuse_run_dir,
    check_no_later_checkpoints,
    check_resumable_folder,
    make_run_dir,
    remove_stale_temporary_files,
    resume_run_dir,
)
from melecole.errors import CheckpointError, ConfigError
from melecole.losses import build_objective, selected_objective
from melecole.utils import comm
from melecole.utils.device import configure_threads, resolve_device
from melecole.utils.files import atomic_write_text
from melecole.utils.logger import attach_log_file, setup_logging
from melecole.utils.progress import progress_bar, progress_enabled

__all__ = [
    "Trainer",
    "make_run_dir",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
    "resume_config",
    "resume_run_dir",
    "remove_stale_temporary_files",
]

# Losses averaged into the checkpoint's "mean_loss_recent" (the last this many iterations).
RECENT_LOSSES = 50


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


def resume_config(resume: str | Path, opts: list[str] | None = None) -> tuple[CN, dict]:
    """The stored config of a run (or checkpoint) to resume, with ``opts`` overrides applied.

    Model-shaping keys cannot be overridden on resume. A run folder of the library that never saved a
    checkpoint is explained (and its stale temporary files removed) by ``check_resumable_folder``.
    """
    check_resumable_folder(resume)
    checkpoint = load_checkpoint(resume)
    stored = checkpoint_cfg(checkpoint)
    cfg = apply_overrides(stored, opts)
    differences = model_shape_differences(stored, cfg)
    if differences:
        raise CheckpointError("cannot change model-shaping keys when resuming: " + "; ".join(differences))
    return cfg, checkpoint


class Trainer:
    """Trains ``build_model(cfg)`` with the objective of LOSS.* / MOCO.* on CPU or GPU.

    Args:
        cfg: frozen config.
        run_dir: folder for config.yaml, log.txt, tensorboard/ and checkpoints/; made if None
            (after the data has been read, so a data error leaves no run folder behind). An existing
            folder must be a run folder of MeLeCoLe or hold none of those names
            (:mod:`melecole.engine.run_folder`); it gets the marker ``.melecole-run.json``.
        resume_checkpoint: a loaded checkpoint dict to continue exactly (weights, optimizer,
            scheduler, scaler, objective state, iteration, RNG); its run folder is reused when
            run_dir is None (it must be a run folder of this library, without later checkpoints).
        supervised_checkpoint: path of a checkpoint whose weights initialise the model
            (model-shaping keys must match).
        ssl_checkpoint: path of a contrastive pre-training checkpoint whose backbone initialises
            the model (the heads start fresh).
    """

    def __init__(
        self,
        cfg: CN,
        run_dir: str | Path | None = None,
        resume_checkpoint: dict | None = None,
        supervised_checkpoint: str | Path | None = None,
        ssl_checkpoint: str | Path | None = None,
    ) -> None:
        from melecole.data import build_val_batches, check_data_root

        self.cfg = cfg
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        self.is_main = self.rank == 0
        self.device = self._setup_device()
        self.logger = setup_logging(None, self.rank, keep_early=True)
        labelled = selected_objective(cfg).labelled
        if labelled:  # contrastive pre-training needs no labelled folder
            check_data_root(cfg, [cfg.DATASET.TRAIN_SPLIT])
        if resume_checkpoint is not None:
            if run_dir is None:
                run_dir = resume_run_dir(resume_checkpoint)
            else:
                check_no_later_checkpoints(Path(run_dir), int(resume_checkpoint["iteration"]),
                                           resume_checkpoint["path"])

        seed_everything(cfg.SYSTEM.SEED + self.rank)
        if cfg.SYSTEM.DETERMINISTIC:
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = self._build_model(supervised_checkpoint, ssl_checkpoint).to(self.device)
        if cfg.HARDWARE.CHANNELS_LAST:  # in place, before the optimizer and any momentum copy see the weights
            model.to(memory_format=torch.channels_last_3d)
        self.model = self.wrap_model(model)
        # Made after wrapping, so that a momentum copy (MoCo) starts from the synchronised weights.
        self.objective = build_objective(cfg, self.model, self.device, self.world_size)
        self.optimizer = build_optimizer(
            cfg, [p for p in self.model.parameters() if p.requires_grad] + self.objective.parameters()
        )
        # Clipping and the logged gradient norm cover everything the optimizer updates.
        self.optimized_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.amp = bool(cfg.HARDWARE.AMP) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0
        self.loader_wait_s = 0.0
        if resume_checkpoint is not None:
            self.load_state(resume_checkpoint)

        self.train_loader = build_training_loader(cfg, self.iteration, self.rank, self.world_size)
        validate = self.is_main and cfg.LOG.VAL_FREQUENCY > 0 and labelled
        self.val_batches = build_val_batches(cfg, rank=0) if validate else []
        self.run_dir = self._open_run_dir(run_dir, resume_checkpoint)
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration or None)
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=RECENT_LOSSES)
        n_parameters = sum(p.numel() for p in unwrap_model(self.model).parameters())
        self.logger.info(
            "run %s | device %s | %d process(es) | %.2fM parameters | iterations %d -> %d",
            self.run_dir, self.device, self.world_size, n_parameters / 1e6, self.iteration, cfg.OPTIM.TOTAL_ITER,
        )

    # ------------------------------------------------------------------------------------------
    def _setup_device(self) -> torch.device:
        """This process's device (HARDWARE.DEVICE, LOCAL_RANK) and its CPU thread count."""
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        device = resolve_device(self.cfg.HARDWARE.DEVICE, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        hardware = self.cfg.HARDWARE
        configure_threads(device, hardware.NUM_THREADS, hardware.NUM_WORKERS, local_processes)
        return device

    def _build_model(self, supervised_checkpoint: str | Path | None, ssl_checkpoint: str | Path | None):
        """``build_model(cfg)``, initialised from a supervised or a contrastive checkpoint if given."""
        from melecole.models import build_model

        model = build_model(self.cfg)
        if supervised_checkpoint is not None:
            checkpoint = load_checkpoint(supervised_checkpoint)
            check_model_compatible(checkpoint, self.cfg)
            fresh = load_fine_tuning_weights(model, checkpoint)
            self.logger.info("initialised weights from %s%s", checkpoint["path"],
                             f" (fresh descriptor head: {len(fresh)} tensors)" if fresh else "")
        if ssl_checkpoint is not None:
            fresh = load_backbone_weights(model, ssl_checkpoint, self.cfg)
            self.logger.info("initialised the backbone from %s (fresh heads: %s)", ssl_checkpoint, len(fresh))
        return model

    def _open_run_dir(self, run_dir: str | Path | None, resume_checkpoint: dict | None) -> Path | None:
        """Rank 0 makes (or reuses) the run folder, writes config.yaml and starts log.txt; every rank
        gets rank 0's folder (its timestamp may differ from another rank's).

        A reused folder must be a run folder of MeLeCoLe (``adopt_or_refuse_run_dir``): nothing is
        written into a folder that holds files the library did not write.
        """
        if self.is_main:
            stored_config = resume_checkpoint.get("config") if resume_checkpoint is not None else None
            try:
                if run_dir is None:
                    run_dir, how = make_run_dir(self.cfg), "new"
                else:
                    run_dir = Path(run_dir)
                    how = adopt_or_refuse_run_dir(run_dir, stored_config)
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                removed = remove_stale_temporary_files(run_dir)
                atomic_write_text(run_dir / "config.yaml", self.cfg.dump())
                attach_log_file(run_dir)
            except OSError as error:
                where = run_dir if run_dir is not None else f"LOG.OUTPUT_PATH '{self.cfg.LOG.OUTPUT_PATH}'"
                raise ConfigError(
                    f"{where}: cannot write the run folder ({error.strerror or error}: {error.filename}), "
                    "expected a writable folder"
                ) from None
            if how == "adopted":
                self.logger.info("run folder of an earlier MeLeCoLe version: marked it as ours (%s)", RUN_MARKER)
            if removed:
                self.logger.info("removed %d stale temporary file(s) of an interrupted write", len(removed))
        if self.world_size > 1:
            shared = [str(run_dir) if run_dir is not None else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        return Path(run_dir) if run_dir is not None else None

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
        """Forward pass and loss terms for one batch (already on the device), by the objective."""
        return self.objective(self.model, batch, self.autocast)

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
            grad_norm = torch.nn.utils.clip_grad_norm_(self.optimized_parameters, self.cfg.OPTIM.GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        scalars = {name: float(value.detach()) for name, value in terms.items()}
        scalars["loss"] = float(loss.detach())
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        return scalars

    # ------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None, keep_history: bool = False) -> list[dict[str, float]]:
        """Trains from the current iteration to OPTIM.TOTAL_ITER (or ``stop_at``, for tests).

        Returns the per-iteration scalars of this call when ``keep_history`` (else an empty list:
        a long run keeps only the last RECENT_LOSSES losses). Ctrl-C and SIGTERM let the step under way
        finish, then save ``last.pt`` and leave (KeyboardInterrupt; a second signal leaves at once);
        any other error is also written to log.txt.
        """
        end = self.cfg.OPTIM.TOTAL_ITER if stop_at is None else min(stop_at, self.cfg.OPTIM.TOTAL_ITER)
        history: list[dict[str, float]] = []
        if self.iteration >= end:
            self.logger.info("nothing to do: at iteration %d of %d", self.iteration, end)
            return history
        show = self.is_main and progress_enabled(self.cfg.LOG.PROGRESS_BAR)
        progress = progress_bar(total=end, initial=self.iteration, desc="train", enabled=show, log_interval_s=None)
        loader = iter(self.train_loader)
        start_time, start_iteration = time.perf_counter(), self.iteration
        self.loader_wait_s = 0.0
        try:
            with interrupt_between_steps() as interrupt:
                while self.iteration < end:
                    waited = time.perf_counter()
                    batch = next(loader)
                    self.loader_wait_s += time.perf_counter() - waited
                    scalars = self.run_step(batch)
                    self.iteration += 1
                    self.recent_losses.append(scalars["loss"])
                    if keep_history:
                        history.append(scalars)
                    self.after_step(scalars, progress)
                    if interrupt.requested(self.device):
                        raise KeyboardInterrupt("stopped after a whole step")
        except KeyboardInterrupt:
            if self.is_main and self.iteration > start_iteration:
                self.logger.warning("interrupted at iteration %d; saving last.pt", self.iteration)
                self.save_checkpoint(final=False)
            raise
        except Exception as error:
            self.logger.error("training stopped at iteration %d: %s", self.iteration, " ".join(str(error).split()))
            raise
        finally:
            progress.close()
        self._finish(start_time, start_iteration)
        return history

    def _finish(self, start_time: float, start_iteration: int) -> None:
        elapsed = time.perf_counter() - start_time
        done = self.iteration - start_iteration
        self.logger.info(
            "trained %d iterations in %.1f s (%.2f it/s, %d CPU threads); waiting for the data loader: %.1f s (%.0f%%)",
            done, elapsed, done / max(elapsed, 1e-9), torch.get_num_threads(), self.loader_wait_s,
            100 * self.loader_wait_s / max(elapsed, 1e-9),
        )
        if self.is_main and self.iteration == self.cfg.OPTIM.TOTAL_ITER:
            self.save_checkpoint(final=True)
        if self.writer is not None:
            self.writer.flush()

    def after_step(self, scalars: dict[str, float], progress: Any) -> None:
        log = self.cfg.LOG
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
        """Mean metric-loss terms over the fixed validation patches (rank 0)."""
        if not self.val_batches:
            return None
        self.model.eval()
        model = unwrap_model(self.model)
        sums: dict[str, float] = {}
        for batch in self.val_batches:
            batch = {name: value.to(self.device) for name, value in batch.items()}
            with self.autocast():
                outputs = model(batch["raw"])
            loss, terms = self.objective.criterion({k: v.float() for k, v in outputs.items()}, batch["labels"])
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
        """Extra checkpoint entries: the recent mean loss and the objective's state (e.g. "moco")."""
        recent = list(self.recent_losses)
        mean_loss_recent = float(sum(recent) / len(recent)) if recent else math.nan
        return {"mean_loss_recent": mean_loss_recent, **self.objective.state_dict()}

    def save_checkpoint(self, final: bool) -> Path:
        """checkpoints/last.pt, then checkpoints/iter_<N>.pt, both written atomically.

        last.pt first: a kill between the two writes leaves no iter_<N>.pt newer than last.pt, which
        would make ``--resume RUN`` refuse to overwrite it.
        """
        folder = self.run_dir / "checkpoints"
        options = dict(
            model=self.model, cfg=self.cfg, iteration=self.iteration, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, rng_state=get_rng_state(), extra=self.state_extra(),
        )
        path = folder / f"iter_{self.iteration}.pt"
        save_checkpoint(folder / "last.pt", **options)
        save_checkpoint(path, **options)
        self.logger.info("saved checkpoint %s%s", path, " (final)" if final else "")
        return path

    def load_state(self, checkpoint: dict) -> None:
        """Continues a run exactly: weights, optimizer, scheduler, scaler, objective, iteration, RNG."""
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
        self.objective.load_state_dict(checkpoint, source=f"checkpoint '{checkpoint['path']}'")
        self.iteration = int(checkpoint["iteration"])
        set_rng_state(checkpoint.get("rng"))
        self.logger.info("resumed %s at iteration %d", checkpoint["path"], self.iteration)
