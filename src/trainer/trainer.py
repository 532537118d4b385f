"""The train / evaluate / checkpoint loop."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from tqdm import tqdm

from trainer.allocator import allocator_in_use
from trainer.checkpoint import (config_changes, load_checkpoint, require_same_data, rng_state, save_checkpoint,
                                set_rng_state)
from trainer.data import BatchLoader, ImageDataset
from trainer.distributed import Dist
from trainer.errors import UserError, require_int
from trainer.figures import confusion_matrix_image, labelled_grid
from trainer.fsutil import atomic_write, lock_run_dir, require_free_space
from trainer.logger import TensorBoardLogger, hparams_of
from trainer.runtime import seconds_since_process_start, set_deterministic
from trainer.schedulers import Schedule

log = logging.getLogger(__name__)

MONITORABLE = ("val/loss", "val/acc", "val/f1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_POLICIES = ("error", "skip")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run. `checkpoint` is the one to resume from; `saved`: it was written for
    this stop (else it is the last one written before, or None when the run wrote none)."""

    def __init__(self, signum: int, checkpoint: Path | None, what: str, saved: bool = True) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        if saved:
            super().__init__(f"stopped by {name} {what}; checkpoint saved to {checkpoint}")
        elif checkpoint is not None:
            super().__init__(f"stopped at once by {name} {what}; the last checkpoint written, {checkpoint}, is intact")
        else:
            super().__init__(f"stopped at once by {name} {what}, before the run wrote a checkpoint")


class EpochMetrics:
    """Mean loss, accuracy and macro F1 over an epoch, accumulated on the device.

    `add` only buffers a batch's results on the device; they reach torchmetrics in one update per
    `flush` (per-batch metric updates cost more than a small model's whole step). `compute()` is the
    only host sync. `state_dict()` holds the buffer too, so a run resumed mid-epoch ends the epoch with
    exactly the numbers of a run that never stopped.
    """

    def __init__(self, num_classes: int, device: torch.device, confusion_matrix: bool = False) -> None:
        self.device = device
        # With confusion_matrix, compute() also sets last_confusion (rows: true class, columns: predicted) and
        # last_predictions/last_targets, (N,) each, in the order the samples were added.
        self.confusion = MulticlassConfusionMatrix(num_classes, validate_args=False).to(device) if confusion_matrix else None
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: torch.Tensor | None = None
        self.last_targets: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # flushed (preds, targets), with confusion_matrix
        # nan_strategy/validate_args off: their checks read values back to the host on every update.
        self.metrics = {"loss": MeanMetric(nan_strategy="disable"),
                        "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                        "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False)}
        for m in self.metrics.values():
            m.persistent(True)  # metric states go into state_dict(), hence into checkpoints
            m.to(device)
        self._losses: list[torch.Tensor] = []  # per-batch mean losses, scalars
        self._preds: list[torch.Tensor] = []  # (B_i,) predicted classes
        self._targets: list[torch.Tensor] = []  # (B_i,)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        self._preds.append(logits.detach().argmax(dim=1))
        self._targets.append(targets)

    @property
    def has_pending(self) -> bool:
        return bool(self._losses)

    def pending_losses(self) -> torch.Tensor:
        """The per-batch mean losses added since the last flush, (k,), consecutive batches in order."""
        return torch.stack(self._losses) if self._losses else torch.empty(0, device=self.device)

    def flush(self) -> None:
        if not self._losses:
            return
        sizes = [t.numel() for t in self._targets]
        # Mean over samples, not batches. torchmetrics 1.9 drops `weight` under nan_strategy="disable", so each
        # batch's mean loss is repeated once per sample; output_size keeps that free of a CUDA host sync.
        per_sample = torch.stack(self._losses).float().repeat_interleave(
            torch.tensor(sizes, device=self.device), output_size=sum(sizes))  # (sum B_i,)
        self.metrics["loss"].update(per_sample)
        preds, targets = torch.cat(self._preds), torch.cat(self._targets)
        self.metrics["acc"].update(preds, targets)
        self.metrics["f1"].update(preds, targets)
        if self.confusion is not None:
            self.confusion.update(preds, targets)
            self._seen.append((preds, targets))
        self._losses, self._preds, self._targets = [], [], []

    def compute(self, prefix: str) -> dict[str, float]:
        self.flush()
        out = {f"{prefix}/{name}": float(m.compute()) for name, m in self.metrics.items()}
        for m in self.metrics.values():
            m.reset()
        if self.confusion is not None:
            self.last_confusion = self.confusion.compute()  # (classes, classes) counts
            self.confusion.reset()
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            preds, targets = zip(*self._seen) if self._seen else ([empty], [empty])
            self.last_predictions, self.last_targets = torch.cat(preds), torch.cat(targets)
            self._seen = []
        return out

    def state_dict(self) -> dict:
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        return {"metrics": {name: dict(m.state_dict()) for name, m in self.metrics.items()},
                "losses": self.pending_losses(), "sizes": [t.numel() for t in self._targets],
                "preds": torch.cat(self._preds) if self._preds else empty,
                "targets": torch.cat(self._targets) if self._targets else empty}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.metrics.items():
            m.load_state_dict(state["metrics"][name])
            m.to(self.device)
        self._losses = list(state["losses"].to(self.device).unbind())
        self._preds = list(state["preds"].to(self.device).split(state["sizes"]))
        self._targets = list(state["targets"].to(self.device).split(state["sizes"]))


def _to_cpu(obj: object) -> object:
    """`obj` with every tensor in it (through dicts and lists) moved to the CPU, to pickle between ranks."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a (classes, classes) confusion matrix with true classes as rows."""
    return (confusion.diag() / confusion.sum(dim=1).clamp(min=1)).tolist()


Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (images, targets) -> logits, loss


@torch.inference_mode()
def evaluate(forward: Forward, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], metrics: EpochMetrics,
             prefix: str, limit_batches: int | None = None) -> dict[str, float]:
    """Loss, accuracy and macro F1 over `loader` (its first `limit_batches`), keyed `<prefix>/loss` etc.
    The model must already be in eval mode."""
    for images, targets in itertools.islice(loader, limit_batches):
        logits, loss = forward(images, targets)
        metrics.add(loss, logits, targets)
    return metrics.compute(prefix)


class Trainer:
    """Fits a classifier on an in-memory dataset, logging to TensorBoard and checkpointing as it goes.

    Arguments come from `configs/trainer/*.yaml` plus the objects `train.py` builds. `model` must
    already be on `device`. `scheduler` is a callable `(optimizer, steps_per_epoch, max_epochs) -> Schedule`
    (a function from `trainer.schedulers`), because the run's length in optimizer steps depends on
    accumulation and batch limits. `logger` is a callable `(log_dir, purge_step) -> TensorBoardLogger`,
    because where the run logs is only known once a resumed checkpoint is read. `config_yaml` is the
    resolved config, stored in checkpoints.

    Checkpoints go to `<run_dir>/<checkpoint_dir>/`: `last.pt` at every epoch end and every
    `checkpoint_every_n_steps` optimizer steps, `best.pt` when the monitored metric improves. Resuming
    (`resume=PATH`) restores everything down to the batch within the epoch and the RNG states, so the
    run ends exactly as if it had never stopped; a checkpoint inside a run directory continues that
    run directory. SIGINT/SIGTERM stop the run after the current optimizer step, with a checkpoint.

    Under torchrun (`dist.world_size > 1`) every rank runs this loop on its shard of `data` (see
    `ImageDataset.shard`), training through DistributedDataParallel; epoch metrics are computed over
    all ranks' samples; only rank 0 writes checkpoints, metrics.json and (through its logger) TensorBoard.
    `self.model` stays the plain module, so checkpoints have no "module." keys.
    """

    def __init__(self, *, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Callable[..., Schedule], data: ImageDataset, logger: Callable[..., TensorBoardLogger],
                 run_dir: str | Path, config_yaml: str, device: torch.device, max_epochs: int,
                 grad_clip_norm: float | None, log_every_n_steps: int, monitor: str, mode: str,
                 checkpoint_dir: str, checkpoint_every_n_steps: int | None, resume: str | None,
                 early_stopping_patience: int | None, early_stopping_min_delta: float, nonfinite_loss: str,
                 deterministic: bool, precision: str, compile: bool, channels_last: bool,
                 accumulate_grad_batches: int, num_threads: int | None, limit_train_batches: int | None,
                 limit_eval_batches: int | None, misclassified_images: int, histogram_every_n_epochs: int | None,
                 log_graph: bool, dist: Dist = Dist(), config_choices: dict[str, str | None] | None = None) -> None:
        require_int("trainer.max_epochs", max_epochs, 1)
        require_int("trainer.log_every_n_steps", log_every_n_steps, 1)
        require_int("trainer.accumulate_grad_batches", accumulate_grad_batches, 1)
        require_int("trainer.misclassified_images", misclassified_images, 0)
        for key, value in (("limit_train_batches", limit_train_batches), ("limit_eval_batches", limit_eval_batches),
                           ("checkpoint_every_n_steps", checkpoint_every_n_steps), ("num_threads", num_threads),
                           ("early_stopping_patience", early_stopping_patience),
                           ("histogram_every_n_epochs", histogram_every_n_epochs)):
            if value is not None:
                require_int(f"trainer.{key}", value, 1)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if precision not in PRECISIONS:
            raise UserError(f"trainer.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and device.type != "cuda":
            raise UserError(f"trainer.precision=fp16 needs CUDA (it trains with a gradient scaler); on {device.type} "
                            "use bf16 or fp32")
        if monitor not in MONITORABLE:
            raise UserError(f"trainer.monitor={monitor!r}: not a validation metric; use one of {', '.join(MONITORABLE)}")
        if mode not in ("min", "max"):
            raise UserError(f"trainer.mode={mode!r}: use min or max")
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise UserError(f"trainer.nonfinite_loss={nonfinite_loss!r}: use error or skip")
        if nonfinite_loss == "skip" and dist.active:  # a rank skipping a backward would leave the others waiting
            raise UserError("trainer.nonfinite_loss=skip does not work with several processes (torchrun); use error")
        if not (isinstance(early_stopping_min_delta, (int, float)) and early_stopping_min_delta >= 0):
            raise UserError(f"trainer.early_stopping_min_delta={early_stopping_min_delta!r}: must be a number >= 0")
        if grad_clip_norm is not None and not (isinstance(grad_clip_norm, (int, float)) and grad_clip_norm > 0):
            raise UserError(f"trainer.grad_clip_norm={grad_clip_norm!r}: must be null or a number > 0")
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        # torch accepts lr=0 (a run that silently learns nothing) and lr=inf (weights gone at the first step)
        if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
            raise UserError(f"optimizer.lr={lrs[0] if len(set(lrs)) == 1 else lrs}: must be a finite number > 0")
        try:  # some loss settings fail only when the loss is called (label_smoothing=2): call it once now
            with torch.no_grad():  # not a training batch
                loss_fn(torch.zeros(2, data.num_classes, device=device), torch.zeros(2, dtype=torch.long, device=device))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"loss={type(loss_fn).__name__}: {' '.join(str(e).split())}") from None
        set_deterministic(deterministic)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.data, self.device, self.config_yaml = data, device, config_yaml
        self.config_choices = config_choices  # the option names composed (model: cnn, ...), stored in checkpoints
        self.max_epochs, self.grad_clip_norm, self.log_every = max_epochs, grad_clip_norm, log_every_n_steps
        self.monitor, self.mode = monitor, mode
        self.checkpoint_every, self.skip_nonfinite = checkpoint_every_n_steps, nonfinite_loss == "skip"
        self.accumulate, self.limit_train_batches = accumulate_grad_batches, limit_train_batches
        self.limit_eval_batches = limit_eval_batches
        self.patience, self.min_delta = early_stopping_patience, early_stopping_min_delta
        self.channels_last = channels_last
        self.misclassified_images, self.histogram_every, self.log_graph = (
            misclassified_images, histogram_every_n_epochs, log_graph)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # Checkpoints save self.model (no "_orig_mod." keys); training and evaluation call the compiled one.
        self.net = torch.compile(model) if compile else model
        self.dist = dist
        # Training goes through DDP, which averages gradients across ranks in backward; evaluation calls
        # self.net directly (no collectives per batch, so ranks with fewer evaluation batches do not wait).
        self.train_net = (DistributedDataParallel(self.net, device_ids=[device] if device.type == "cuda" else None)
                          if dist.active else self.net)
        try:  # per-step schedules need the run's length in optimizer steps, which only the Trainer knows
            self.schedule = scheduler(optimizer, steps_per_epoch=self.steps_per_epoch, max_epochs=max_epochs)
        except (ValueError, TypeError) as e:
            raise UserError(f"scheduler={getattr(scheduler, 'func', scheduler).__name__}: {e}") from None
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.epoch = self.global_step = 0  # epochs completed, optimizer steps taken
        self.batch_in_epoch = 0  # batches of epoch `self.epoch` already trained (non-zero only mid-epoch)
        self.skipped_batches = 0  # with nonfinite_loss=skip
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0  # by more than early_stopping_min_delta
        self.startup_s: float | None = None  # process start -> first training step, set by fit()
        self._stop_signal: int | None = None  # set by a SIGINT/SIGTERM handler during fit()
        self._stop_signal_at = 0.0  # time.monotonic() of that signal
        self.train_metrics = EpochMetrics(data.num_classes, device)
        self.eval_metrics = EpochMetrics(data.num_classes, device, confusion_matrix=True)
        resumed = Path(resume).expanduser() if resume else None
        # A checkpoint inside a run directory continues that run there; any other run starts in run_dir.
        self.run_dir = next((d for d in (resumed.parent, resumed.parent.parent) if (d / ".hydra").is_dir()),
                            Path(run_dir)) if resumed else Path(run_dir)
        # Rank 0 holds the run directory while this process trains in it, from before a resume reads its files.
        self._run_lock = lock_run_dir(self.run_dir) if dist.is_main else None
        if resumed:
            self._resume(resumed, checkpoint_dir)
        self.ckpt_dir = self.run_dir / checkpoint_dir
        if dist.is_main:  # a full disk is found now, not after the first epoch
            size = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20  # weights, 2 optimizer
            require_free_space(self.ckpt_dir, 3 * size, f"this run's checkpoints (last.pt and best.pt of about "
                               f"{size / 2**20:.1f} MiB each, and a temporary copy while one is written)")
        self.logger = logger(log_dir=self.run_dir, purge_step=self.global_step + 1 if resumed else None)
        if not resumed:
            self.logger.log_text("config", config_yaml)
            self.logger.log_images("inputs/train", data.train.raw(slice(64))[0])  # what the model sees, before normalising

    def fit(self) -> dict[str, float]:
        """Train from the current epoch to `max_epochs`; validate, step epoch schedules and checkpoint each epoch."""
        self.startup_s = seconds_since_process_start()
        log.info("first training step %.1fs after process start (malloc: %s)", self.startup_s, allocator_in_use())
        with self._stop_on_signals():
            for epoch in range(self.epoch, self.max_epochs):
                if self._patience_exhausted():
                    break
                start, first_batch = time.perf_counter(), self.batch_in_epoch
                train = self.train_epoch(epoch)
                val = self.evaluate(self.data.val, "val")
                seconds = time.perf_counter() - start
                self.epoch, self.batch_in_epoch = epoch + 1, 0
                self.schedule.after_epoch(val[self.monitor])
                improved = self._improves(val[self.monitor])
                significant = self._improves(val[self.monitor], margin=self.min_delta)
                self.epochs_without_improvement = 0 if significant else self.epochs_without_improvement + 1
                if improved:
                    self.best_metric, self.best_epoch = val[self.monitor], self.epoch
                samples = self.data.train.samples_between(first_batch, self.batches_per_epoch)
                speed = {"epoch/time_s": seconds, "epoch/samples_per_s": samples / seconds}
                self.logger.log_metrics({**train, **val, **speed, "epoch": self.epoch}, self.global_step)
                log.info("epoch %d/%d  %s  %.1fs  %.0f samples/s  [%.1fs since start]%s", self.epoch,
                         self.max_epochs, "  ".join(f"{k} {v:.4f}" for k, v in {**train, **val}.items()), seconds,
                         speed["epoch/samples_per_s"], seconds_since_process_start(), "  (best)" if improved else "")
                if improved:  # before last.pt: a kill between the two must not leave a last.pt whose best is unsaved
                    self.save_checkpoint("best.pt")
                self.save_checkpoint("last.pt")
                self._stop_if_signalled()  # after the last epoch too: resuming then runs just the test
        return {f"best/{self.monitor}": self.best_metric, "best/epoch": self.best_epoch}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split, or the rest of it when resumed mid-epoch.

        Reads values back from the device only every `log_every` optimizer steps and at checkpoints.
        """
        self.model.train()
        self.data.train.set_epoch(epoch)
        batches, start = self.batches_per_epoch, self.batch_in_epoch
        bar = tqdm(total=batches, initial=start, desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True)
        for i, (images, targets) in zip(range(start, batches), self.data.train.iter_from(start)):
            stepping = not (i + 1) % self.accumulate or i + 1 == batches
            # DDP all-reduces gradients in every backward; accumulating batches only need the last one's.
            sync = (contextlib.nullcontext() if stepping or not self.dist.active else self.train_net.no_sync())
            with sync:
                logits, loss = self._forward(images, targets, self.train_net)
                if self.skip_nonfinite and not torch.isfinite(loss):  # a host sync per batch, only in skip mode
                    self.skipped_batches += 1
                    log.warning("epoch %d, batch %d: loss is %s; batch skipped", epoch + 1, i + 1,
                                float(loss.detach()))
                else:
                    self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()
                    self.train_metrics.add(loss, logits, targets)
            bar.update()
            if not stepping:
                continue  # accumulate gradients over `accumulate` batches per optimizer step
            if i + 1 == batches and self.histogram_every and (epoch + 1) % self.histogram_every == 0:
                # nothing reads the weights before this check (a sync once an epoch); batch i's step is not taken yet
                self._check_finite(epoch, batches_done=i + 1, steps_done=self.global_step + 1)
                # the epoch's last gradients, before the step applies and clears them; unscaled under fp16
                self.logger.log_histograms(self.model, self.global_step + 1, self.scaler.get_scale())
            used = self._optimizer_step()
            self.batch_in_epoch = i + 1
            if self.global_step % self.log_every == 0 and self.train_metrics.has_pending:
                mean_loss = self._check_finite(epoch)  # the one host sync per log interval
                self.logger.log_metrics({"train/loss": mean_loss, **used}, self.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                self.train_metrics.flush()
            if i + 1 < batches:  # the epoch's end has its own checkpoint and signal check
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                    self._check_finite(epoch)
                    self.save_checkpoint("last.pt")
                self._stop_if_signalled(epoch)
        bar.close()
        self._check_finite(epoch)
        self._require_finite_weights()  # before validation, pictures and checkpoints read them
        metrics = self.train_metrics.compute("train")
        # train/loss is the per-interval curve; the epoch mean gets its own tag.
        metrics["train/loss_epoch"] = metrics.pop("train/loss")
        if self.skip_nonfinite:
            metrics["train/skipped_batches"] = float(self.skipped_batches)
        return metrics

    @property
    def batches_per_epoch(self) -> int:
        return min(len(self.data.train), self.limit_train_batches or len(self.data.train))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (what per-step schedules count)."""
        return math.ceil(self.batches_per_epoch / self.accumulate)

    def _forward(self, images: torch.Tensor, targets: torch.Tensor,
                 net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) stored as NHWC
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = (self.net if net is None else net)(images)  # (B, classes)
            return logits, self.loss_fn(logits, targets)

    def _optimizer_step(self) -> dict[str, float]:
        """Clip, step (through the fp16 scaler when on), zero the grads and step per-batch schedules.
        Returns the `lr` (and `momentum`: SGD's momentum or Adam's beta1, if any) this step used."""
        if any(p.grad is not None for p in self.model.parameters()):  # none when every batch was skipped
            if self.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        group = self.optimizer.param_groups[0]
        used = {"lr": group["lr"]}
        momentum = group.get("momentum", group.get("betas", (None,))[0])
        if momentum is not None:
            used["momentum"] = momentum
        self.schedule.after_batch()
        self.global_step += 1
        return used

    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        """Loss, accuracy and macro F1 of the model over `loader`, with keys `<prefix>/loss` etc.

        Also logs the confusion matrix as a picture and, for validation, a grid of misclassified images.
        """
        self.model.eval()
        metrics = evaluate(self._forward, loader, self.eval_metrics, prefix, self.limit_eval_batches)
        if not self.dist.is_main:  # the pictures go to TensorBoard, which only rank 0 writes
            return metrics
        confusion = confusion_matrix_image(self.eval_metrics.last_confusion, self.data.classes)
        self.logger.log_image(f"{prefix}/confusion_matrix", confusion, self.global_step)
        if prefix == "val" and self.misclassified_images:
            self._log_misclassified(loader, prefix)
        return metrics

    def _log_misclassified(self, loader: BatchLoader, prefix: str) -> None:
        """The first `misclassified_images` wrong predictions of the last evaluation, captioned."""
        predicted = self.eval_metrics.last_predictions  # (N,) this rank's samples, in the loader's stored order
        wrong = (predicted != self.eval_metrics.last_targets).nonzero().squeeze(1)[:self.misclassified_images]
        if not wrong.numel():
            return
        positions = loader.positions(self.limit_eval_batches).to(wrong.device)  # (N,) where they are stored
        images, labels = loader.raw(positions[wrong])  # (n, C, H, W) uint8, (n,)
        names = self.data.classes
        captions = [(f"pred {names[p]}", f"true {names[t]}") for p, t in zip(predicted[wrong].tolist(), labels.tolist())]
        self.logger.log_image(f"{prefix}/misclassified", labelled_grid(images, captions), self.global_step)

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (else the current weights) on the test split; write metrics.json.

        A SIGINT/SIGTERM stops it at once: training is over and last.pt holds it, so a resume of that
        checkpoint runs just the test (see _resume)."""
        with self._stop_on_signals(at_once=True):
            return self._test()

    def _test(self) -> dict[str, float]:
        best = self.ckpt_dir / "best.pt"
        if self.dist.is_main and best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        self.dist.broadcast_module(self.model)  # rank 0 wrote best.pt; other nodes may not see its file
        metrics = self.evaluate(self.data.test, "test")
        confusion = self.eval_metrics.last_confusion.cpu()  # (classes, classes): rows true, columns predicted
        per_class = dict(zip(self.data.classes, per_class_accuracy(confusion)))
        self.logger.log_metrics({f"test/acc_class/{name.replace('/', '-')}": acc for name, acc in per_class.items()},
                                self.global_step)
        self.logger.log_confusion_matrix("test/confusion_matrix_counts", confusion, self.data.classes, self.global_step)
        if self.log_graph:
            images, _ = self.data.test.raw(slice(2))
            example = self.data.test.transform(images)  # (2, C, H, W) float, as the model gets it
            self.logger.log_graph(self.model, example.contiguous(memory_format=torch.channels_last)
                                  if self.channels_last else example)
        final = {**metrics, **({f"best/{self.monitor}": self.best_metric} if self.best_metric is not None else {})}
        self.logger.log_hparams(hparams_of(self.config_yaml), final, self.global_step)
        summary = {**metrics, f"best/{self.monitor}": self.best_metric, "best/epoch": self.best_epoch,
                   "epochs": self.epoch, "global_step": self.global_step, "peak_rss_mib": peak_rss_mib(),
                   "allocator": allocator_in_use(),
                   "startup_s": self.startup_s, "seconds_since_start": seconds_since_process_start(),
                   "per_class_acc": per_class}
        if self.device.type == "cuda":
            summary["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.dist.is_main:
            summary["world_size"] = self.dist.world_size
            with atomic_write(self.run_dir / "metrics.json") as f:
                f.write(json.dumps(summary, indent=2).encode())
        log.info("test  %s  [%.1fs since start, peak RSS %.0f MiB]", "  ".join(f"{k} {v:.4f}" for k, v in
                 metrics.items()), summary["seconds_since_start"], summary["peak_rss_mib"])
        self.logger.close()
        if self._run_lock is not None:  # the run is complete: another process may train on from it
            self._run_lock.close()
            self._run_lock = None
        return metrics

    @property
    def result_keys(self) -> tuple[str, ...]:
        """What a finished run reports: `test()`'s metrics, then `best/<monitor>` from `fit()`."""
        return (*(f"test/{name}" for name in self.eval_metrics.metrics), f"best/{self.monitor}")

    def save_checkpoint(self, name: str) -> Path:
        """Atomically write everything needed to continue this run to `<checkpoint_dir>/<name>`.

        Refuses non-finite weights, so no checkpoint (best.pt included) ever holds a diverged model.
        With several processes every rank must call it (it gathers their unfinished epoch metrics); rank 0
        writes the file. The RNG states are rank 0's: all ranks share the seed and draw alike, so they are equal.
        """
        self._require_finite_weights(f"{name} not written, the last good checkpoint is kept")
        path = self.ckpt_dir / name
        train_metrics = self.dist.all_gather_object(_to_cpu(self.train_metrics.state_dict()))  # one per rank
        if not self.dist.is_main:
            return path
        save_checkpoint(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            "world_size": self.dist.world_size, "train_metrics_of_ranks": train_metrics,
            "train_metrics": train_metrics[0], "skipped_batches": self.skipped_batches,
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "monitor": self.monitor,
            "epochs_without_improvement": self.epochs_without_improvement,
            "rng": rng_state(), "config": self.config_yaml, "choices": self.config_choices,
            "data": self.data.identity()})
        # The checkpoint says "everything up to this step is done": make the logged scalars as durable, so a
        # kill after it loses no TensorBoard steps before it (the resumed run purges the ones after).
        self.logger.flush()
        return path

    def _require_finite_weights(self, consequence: str = "stopped before anything reads them") -> None:
        """Raise NonFiniteLossError if a weight is NaN or infinite (one host sync)."""
        params = [p.detach() for p in self.model.parameters()]
        if not torch.stack([p.isfinite().all() for p in params]).all():
            bad = next(n for n, p in self.model.named_parameters() if not p.isfinite().all())
            raise NonFiniteLossError(f"weights became non-finite ({bad}) by step {self.global_step} of epoch "
                                     f"{self.epoch + 1}; {consequence}; lower optimizer.lr or set trainer.grad_clip_norm")

    def _resume(self, path: Path, checkpoint_dir: str) -> None:
        """Restore model, optimizer, schedule, counters, metrics and RNGs from `path`, continuing in self.run_dir."""
        state = load_checkpoint(path)
        require_same_data(state["data"], self.data.identity(), path)  # before the config lines: a refusal is one line
        saved_world = state.get("world_size", 1)  # checkpoints before DDP support: single-process
        if state["batch_in_epoch"] and saved_world != self.dist.world_size:
            raise UserError(f"trainer.resume={str(path)!r} stopped mid-epoch in a run of {saved_world} process(es); "
                            f"resume it with {saved_world}, not {self.dist.world_size} (an epoch-end checkpoint, "
                            "e.g. best.pt, resumes with any number)")
        for change in config_changes(state["config"], self.config_yaml, mid_epoch=state["batch_in_epoch"] > 0):
            log.info("resume: config changed, %s", change)
        run_dir = self.run_dir
        if state["epoch"] >= self.max_epochs:
            if (run_dir / "metrics.json").is_file():
                raise UserError(f"trainer.resume={str(path)!r} has already trained {state['epoch']} epochs and been "
                                f"tested; raise trainer.max_epochs (now {self.max_epochs}) to train on")
            log.info("resume: training ended at epoch %d, but the run has no test result; running just the test",
                     state["epoch"])
        if state["batch_in_epoch"] > self.batches_per_epoch:
            raise UserError(f"trainer.resume={str(path)!r} stopped after batch {state['batch_in_epoch']} of its "
                            f"epoch, but an epoch now has {self.batches_per_epoch} batches")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.train_metrics.load_state_dict(state["train_metrics_of_ranks"][self.dist.rank] if saved_world > 1
                                           else state["train_metrics"])
        self.skipped_batches = state["skipped_batches"]
        if state["monitor"] == self.monitor:
            self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
            self.epochs_without_improvement = state["epochs_without_improvement"]
        set_rng_state(state["rng"])
        for stale in (run_dir / checkpoint_dir).glob(".*.tmp") if self.dist.is_main else ():
            stale.unlink()  # left by a kill during a checkpoint write
        where = (f"epoch {self.epoch + 1}, after batch {self.batch_in_epoch}" if self.batch_in_epoch
                 else f"the start of epoch {self.epoch + 1}")
        log.info("resumed %s at %s (step %d); continuing in %s", path, where, self.global_step, run_dir)

    def _improves(self, value: float, margin: float = 0.0) -> bool:
        """Whether `value` of the monitored metric beats the best so far by more than `margin`."""
        if not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric + margin if self.mode == "max" else value < self.best_metric - margin

    def _patience_exhausted(self) -> bool:
        if self.patience is None or self.epochs_without_improvement < self.patience:
            return False
        log.info("early stopping after epoch %d: %s has not improved by more than %g for %d epochs (best %.4f at "
                 "epoch %s)", self.epoch, self.monitor, self.min_delta, self.epochs_without_improvement,
                 self.best_metric, self.best_epoch)
        return True

    def _check_finite(self, epoch: int, batches_done: int | None = None, steps_done: int | None = None) -> float:
        """Mean of the training losses not yet flushed (a host sync); raise naming the first non-finite batch.
        `batches_done`/`steps_done`: the epoch's batches and the run's steps the pending losses run up to, when
        not yet counted in batch_in_epoch/global_step."""
        losses = self.train_metrics.pending_losses()  # (k,) the batches up to batches_done, in order
        if not losses.numel():
            return math.nan
        mean = float(losses.mean())
        if not math.isfinite(mean):
            done = self.batch_in_epoch if batches_done is None else batches_done
            steps = self.global_step if steps_done is None else steps_done
            first = int((~torch.isfinite(losses)).nonzero()[0])
            batch = done - losses.numel() + first  # 0-based, within the epoch
            step = steps - ((done - 1) // self.accumulate - batch // self.accumulate)
            raise NonFiniteLossError(f"training loss is {float(losses[first])} at epoch {epoch + 1}, batch "
                                     f"{batch + 1} (optimizer step {step}); lower optimizer.lr, set "
                                     "trainer.grad_clip_norm, or skip such batches with trainer.nonfinite_loss=skip")
        return mean

    @contextlib.contextmanager
    def _stop_on_signals(self, at_once: bool = False) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after the current optimizer step, with a checkpoint.
        A second signal, or the first one with `at_once`, stops at once (the atomic writes keep every
        checkpoint whole), raising TrainingInterrupted with the last checkpoint written."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None or at_once:
                # torchrun relays the terminal's Ctrl-C to its workers, which got it from the terminal too:
                # the same request twice within moments, not a second one.
                if not (self.dist.active and time.monotonic() - self._stop_signal_at < 5):
                    last = self.ckpt_dir / "last.pt"
                    raise TrainingInterrupted(signum, last if last.is_file() else None,
                                              "during the test" if at_once else f"in epoch {self.epoch + 1}", saved=False)
                return
            self._stop_signal, self._stop_signal_at = signum, time.monotonic()
            log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)",
                        signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_if_signalled(self, epoch: int | None = None) -> None:
        """After a stop signal: checkpoint mid-epoch (`epoch` given) or rely on the epoch's, then raise."""
        if self.dist.active:
            # A signal can reach the ranks at different steps; they must all stop at the same one. Agreeing
            # costs a collective (and a host sync on CUDA), so they do it at log points and epoch ends only.
            if epoch is not None and self.global_step % self.log_every:
                return
            self._stop_signal = self.dist.max_int(self._stop_signal or 0) or None
        if self._stop_signal is None:
            return
        if epoch is not None:
            self._check_finite(epoch)
            self.save_checkpoint("last.pt")
        where = f"in epoch {epoch + 1}" if epoch is not None else f"after epoch {self.epoch}"
        raise TrainingInterrupted(self._stop_signal, self.ckpt_dir / "last.pt", f"{where} at step {self.global_step}")
