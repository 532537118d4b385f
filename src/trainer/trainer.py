"""The train / evaluate / checkpoint loop."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm

from trainer.checkpoint import config_changes, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.data import BatchLoader, IDXImageDataset
from trainer.errors import UserError, require_int
from trainer.fsutil import atomic_write
from trainer.logger import TensorBoardLogger
from trainer.runtime import seconds_since_process_start, set_deterministic
from trainer.schedulers import Schedule

log = logging.getLogger(__name__)

MONITORABLE = ("val/loss", "val/acc", "val/f1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class EpochMetrics:
    """Mean loss, accuracy and macro F1, accumulated on the device. `compute()` is the only host sync."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        # nan_strategy/validate_args off: their checks read values back to the host on every update.
        self.loss = MeanMetric(nan_strategy="disable").to(device)
        self.acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False).to(device)
        self.f1 = MulticlassF1Score(num_classes, average="macro", validate_args=False).to(device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.update_many([loss.detach()], [logits.argmax(dim=1)], [targets])

    def update_many(self, losses: list[torch.Tensor], preds: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """Add several batches at once: per-batch mean losses (scalars), predicted classes and targets (B_i,)."""
        if not losses:
            return
        sizes = [t.numel() for t in targets]
        # Mean over samples, not batches. torchmetrics 1.9 drops `weight` under nan_strategy="disable", so each
        # batch's mean loss is repeated once per sample; output_size keeps that free of a CUDA host sync.
        per_sample = torch.stack(losses).float().repeat_interleave(
            torch.tensor(sizes, device=losses[0].device), output_size=sum(sizes))  # (sum B_i,)
        self.loss.update(per_sample)
        preds_, targets_ = torch.cat(preds), torch.cat(targets)
        self.acc.update(preds_, targets_)
        self.f1.update(preds_, targets_)

    def compute(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{name}": float(m.compute()) for name, m in
               (("loss", self.loss), ("acc", self.acc), ("f1", self.f1))}
        for m in (self.loss, self.acc, self.f1):
            m.reset()
        return out


class Trainer:
    """Fits a classifier on an in-memory dataset, logging to TensorBoard and checkpointing every epoch.

    Arguments come from `configs/trainer/*.yaml` plus the objects `train.py` builds. `model` must
    already be on `device`. `scheduler` is a callable `(optimizer, steps_per_epoch, max_epochs) -> Schedule`
    (a function from `trainer.schedulers`), because the run's length in optimizer steps depends on
    accumulation and batch limits. `logger` is a callable `(log_dir, purge_step) -> TensorBoardLogger`,
    because where the run logs is only known once a resumed checkpoint is read. `config_yaml` is the resolved config, stored in checkpoints.
    Checkpoints go to `<run_dir>/<checkpoint_dir>/{last,best}.pt`; resuming from a checkpoint that
    lives in a run directory continues that run directory.
    """

    def __init__(self, *, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Callable[..., Schedule], data: IDXImageDataset, logger: Callable[..., TensorBoardLogger],
                 run_dir: str | Path, config_yaml: str, device: torch.device, max_epochs: int,
                 grad_clip_norm: float | None, log_every_n_steps: int, monitor: str, mode: str,
                 checkpoint_dir: str, resume: str | None, deterministic: bool, precision: str,
                 compile: bool, channels_last: bool, accumulate_grad_batches: int, num_threads: int | None,
                 limit_train_batches: int | None) -> None:
        require_int("trainer.max_epochs", max_epochs, 1)
        require_int("trainer.log_every_n_steps", log_every_n_steps, 1)
        require_int("trainer.accumulate_grad_batches", accumulate_grad_batches, 1)
        if limit_train_batches is not None:
            require_int("trainer.limit_train_batches", limit_train_batches, 1)
        if num_threads is not None:
            torch.set_num_threads(require_int("trainer.num_threads", num_threads, 1))
        if precision not in PRECISIONS:
            raise UserError(f"trainer.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and device.type != "cuda":
            raise UserError(f"trainer.precision=fp16 needs CUDA (it trains with a gradient scaler); on {device.type} "
                            "use bf16 or fp32")
        if monitor not in MONITORABLE:
            raise UserError(f"trainer.monitor={monitor!r}: not a validation metric; use one of {', '.join(MONITORABLE)}")
        if mode not in ("min", "max"):
            raise UserError(f"trainer.mode={mode!r}: use min or max")
        if grad_clip_norm is not None and not (isinstance(grad_clip_norm, (int, float)) and grad_clip_norm > 0):
            raise UserError(f"trainer.grad_clip_norm={grad_clip_norm!r}: must be null or a number > 0")
        set_deterministic(deterministic)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.data, self.device, self.config_yaml = data, device, config_yaml
        self.max_epochs, self.grad_clip_norm, self.log_every = max_epochs, grad_clip_norm, log_every_n_steps
        self.monitor, self.mode = monitor, mode
        self.accumulate, self.limit_train_batches = accumulate_grad_batches, limit_train_batches
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # Checkpoints save self.model (no "_orig_mod." keys); training and evaluation call the compiled one.
        self.net = torch.compile(model) if compile else model
        try:  # per-step schedules need the run's length in optimizer steps, which only the Trainer knows
            self.schedule = scheduler(optimizer, steps_per_epoch=self.steps_per_epoch, max_epochs=max_epochs)
        except (ValueError, TypeError) as e:
            raise UserError(f"scheduler={getattr(scheduler, 'func', scheduler).__name__}: {e}") from None
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.epoch = self.global_step = 0  # epochs completed, optimizer steps taken
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.train_metrics = EpochMetrics(data.num_classes, device)
        self.eval_metrics = EpochMetrics(data.num_classes, device)
        resumed = self._resume(Path(resume).expanduser(), Path(run_dir)) if resume else None
        self.run_dir = resumed or Path(run_dir)
        self.ckpt_dir = self.run_dir / checkpoint_dir
        self.logger = logger(log_dir=self.run_dir, purge_step=self.global_step + 1 if resumed else None)
        if not resumed:
            self.logger.log_text("config", config_yaml)

    def fit(self) -> dict[str, float]:
        """Train from the current epoch to `max_epochs`; validate, step epoch schedules and checkpoint each epoch."""
        for epoch in range(self.epoch, self.max_epochs):
            start = time.perf_counter()
            train = self.train_epoch(epoch)
            val = self.evaluate(self.data.val, "val")
            seconds = time.perf_counter() - start
            self.epoch = epoch + 1
            self.schedule.after_epoch(val[self.monitor])
            improved = self.best_metric is None or (
                val[self.monitor] > self.best_metric if self.mode == "max" else val[self.monitor] < self.best_metric)
            if improved:
                self.best_metric, self.best_epoch = val[self.monitor], self.epoch
            samples = min(self.data.train.num_samples, self.batches_per_epoch * self.data.train.batch_size)
            speed = {"epoch/time_s": seconds, "epoch/samples_per_s": samples / seconds}
            self.logger.log_metrics({**train, **val, **speed, "epoch": self.epoch}, self.global_step)
            log.info("epoch %d/%d  %s  %.1fs  %.0f samples/s  [%.1fs since start]%s", self.epoch, self.max_epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in {**train, **val}.items()), seconds,
                     speed["epoch/samples_per_s"], seconds_since_process_start(), "  (best)" if improved else "")
            self.save_checkpoint("last.pt")
            if improved:
                self.save_checkpoint("best.pt")
        return {f"best/{self.monitor}": self.best_metric, "best/epoch": self.best_epoch}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split. Reads values back from the device only every `log_every` steps."""
        self.model.train()
        self.data.train.set_epoch(epoch)
        batches = self.batches_per_epoch
        # Per-batch results stay on the device in these lists and reach torchmetrics once per log interval:
        # per-step metric updates cost more than a small model's whole step.
        losses: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []
        targets_seen: list[torch.Tensor] = []
        bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True)
        for i, (images, targets) in zip(range(batches), self.data.train):
            logits, loss = self._forward(images, targets)
            self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()
            losses.append(loss.detach())
            preds.append(logits.detach().argmax(dim=1))
            targets_seen.append(targets)
            bar.update()
            if (i + 1) % self.accumulate and i + 1 < batches:
                continue  # accumulate gradients over `accumulate` batches per optimizer step
            lr = self._optimizer_step()
            if self.global_step % self.log_every == 0:
                mean_loss = float(torch.stack(losses).mean())  # the one host sync per log interval
                self._check_finite(mean_loss, len(losses))
                self.logger.log_metrics({"train/loss": mean_loss, "lr": lr}, self.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                self.train_metrics.update_many(losses, preds, targets_seen)
                losses, preds, targets_seen = [], [], []
        bar.close()
        self.train_metrics.update_many(losses, preds, targets_seen)
        metrics = self.train_metrics.compute("train")
        # train/loss is the per-interval curve; the epoch mean gets its own tag.
        metrics["train/loss_epoch"] = metrics.pop("train/loss")
        self._check_finite(metrics["train/loss_epoch"], batches)
        return metrics

    @property
    def batches_per_epoch(self) -> int:
        return min(len(self.data.train), self.limit_train_batches or len(self.data.train))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (what per-step schedules count)."""
        return math.ceil(self.batches_per_epoch / self.accumulate)

    def _forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) stored as NHWC
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.net(images)  # (B, classes)
            return logits, self.loss_fn(logits, targets)

    def _optimizer_step(self) -> float:
        """Clip, step (through the fp16 scaler when on), zero the grads and step per-batch schedules.
        Returns the LR this step used."""
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.after_batch()
        self.global_step += 1
        return lr

    @torch.inference_mode()
    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        """Loss, accuracy and macro F1 of the model over `loader`, with keys `<prefix>/loss` etc."""
        self.model.eval()
        for images, targets in loader:
            logits, loss = self._forward(images, targets)
            self.eval_metrics.update(loss, logits, targets)
        return self.eval_metrics.compute(prefix)

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (else the current weights) on the test split; write metrics.json."""
        best = self.ckpt_dir / "best.pt"
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        metrics = self.evaluate(self.data.test, "test")
        self.logger.log_metrics(metrics, self.global_step)
        summary = {**metrics, f"best/{self.monitor}": self.best_metric, "best/epoch": self.best_epoch,
                   "epochs": self.epoch, "global_step": self.global_step, "peak_rss_mib": peak_rss_mib(),
                   "seconds_since_start": seconds_since_process_start()}
        if self.device.type == "cuda":
            summary["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        with atomic_write(self.run_dir / "metrics.json") as f:
            f.write(json.dumps(summary, indent=2).encode())
        log.info("test  %s  [%.1fs since start, peak RSS %.0f MiB]", "  ".join(f"{k} {v:.4f}" for k, v in
                 metrics.items()), summary["seconds_since_start"], summary["peak_rss_mib"])
        self.logger.close()
        return metrics

    def save_checkpoint(self, name: str) -> Path:
        """Atomically write everything needed to continue this run to `<checkpoint_dir>/<name>`."""
        path = self.ckpt_dir / name
        save_checkpoint(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "monitor": self.monitor,
            "rng": rng_state(), "config": self.config_yaml})
        return path

    def _resume(self, path: Path, new_run_dir: Path) -> Path:
        """Restore model, optimizer, schedule, counters and RNGs from `path`; return the run dir to continue."""
        state = load_checkpoint(path)
        for change in config_changes(state["config"], self.config_yaml):
            log.info("resume: config changed, %s", change)
        if state["epoch"] >= self.max_epochs:
            raise UserError(f"trainer.resume={str(path)!r} has already trained {state['epoch']} epochs; "
                            f"raise trainer.max_epochs (now {self.max_epochs}) to train on")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        if state.get("monitor") == self.monitor:
            self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        set_rng_state(state["rng"])
        run_dir = next((d for d in (path.parent, path.parent.parent) if (d / ".hydra").is_dir()), new_run_dir)
        log.info("resumed %s at epoch %d (step %d); continuing in %s", path, self.epoch, self.global_step, run_dir)
        return run_dir

    def _check_finite(self, loss: float, steps: int) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss} in the {steps} steps up to global step "
                                     f"{self.global_step} (epoch {self.epoch + 1}); lower optimizer.lr or set "
                                     "trainer.grad_clip_norm")
