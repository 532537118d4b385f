"""The train / evaluate / checkpoint loop. What is not the loop lives with its collaborators: the settings
(trainer.loop.options), one step's forward pass (trainer.loop.step), the resumable state (trainer.loop.state),
epoch metrics (trainer.loop.metrics), stop signals (trainer.loop.signals), the checkpoint format (trainer.run)
and the pictures and results (trainer.report)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from trainer.data import BatchLoader, ImageDataset
from trainer.distributed import Dist
from trainer.errors import UserError
from trainer.loop import schedulers
from trainer.loop.callbacks import Callback, Callbacks
from trainer.loop.cuda_graph import graphed_training_step
from trainer.loop.ema import make_ema
from trainer.loop.metrics import EpochMetrics, evaluate
from trainer.loop.nonfinite import (
    NonFiniteLossError,
    mean_finite_loss,
    require_finite_weights,
)
from trainer.loop.options import TrainerOptions
from trainer.loop.schedulers import Schedule
from trainer.loop.seeding import set_deterministic
from trainer.loop.signals import StopSignals, TrainingInterrupted
from trainer.loop.state import RunState
from trainer.loop.step import autocast_for, check_optimizer, forward_pass
from trainer.report.run_report import RunReport, is_per_class
from trainer.report.tracker import Tracker
from trainer.run.checkpoint import load_checkpoint
from trainer.system import allocator_in_use, resolve_device, seconds_since_process_start
from trainer.tasks import Classification, Task

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "Trainer", "TrainingInterrupted"]


class Trainer:
    """Fits a model (a classifier by default) on an in-memory dataset, logging to TensorBoard and checkpointing.

    Objects come from the composition root (trainer/cli/train.py) or a user's script (docs/python_api.md):
    `model` and `data` already on `device` ("auto" picks cuda, mps, then cpu); `scheduler(optimizer,
    steps_per_epoch, max_epochs)` and `logger(log_dir, purge_step)` are called here, where the run's length in
    steps and its directory (a resumed checkpoint's) are known. `options` holds every setting, in groups
    (trainer.loop.options: fit, checkpoints, hardware, averaging, report), each validated before anything is
    built. `metrics`: more metrics by name (torchmetrics', by `metrics=[...]`), measured on validation and the
    test. `callbacks`: `Callback`s (a list, or a dict whose names key their state in the checkpoints), called at
    the loop's events (trainer.loop.callbacks). `logger` returns a tracker (trainer.report.tracker), or several
    as one. `config_yaml` is stored in the checkpoints; `config_choices` (the option of each group) lets eval
    rebuild the model. `task` (trainer.tasks; classification by default) decides which losses fit, the metrics of
    each split and the pictures; `data` must read its targets (`targets=task.targets`) and `model` have
    `task.output_size(data.num_classes)` outputs.
    `last.pt` is written every epoch and `checkpoint_every_n_steps` steps, `best.pt` on improvement;
    `options.checkpoints.resume` continues exactly, down to the batch and the RNGs. SIGINT/SIGTERM stop after the
    current step, with a checkpoint. Under torchrun each rank trains its shard through DDP and rank 0 alone
    writes files; `self.model` stays the plain module.
    """

    def __init__(self, *, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Callable[..., Schedule], data: ImageDataset, logger: Callable[..., Tracker],
                 run_dir: str | Path, options: TrainerOptions, device: torch.device | str = "auto", dist: Dist = Dist(),
                 metrics: dict[str, Any] | None = None, callbacks: dict[str, Callback] | list[Callback] | None = None,
                 config_yaml: str = "{}", config_choices: dict[str, str | None] | None = None,
                 task: Task | None = None) -> None:
        device = resolve_device(device) if isinstance(device, str) else device  # "auto" from Python (defaults())
        options.validate(device, dist)
        fit, ckpt, hw = options.fit, options.checkpoints, options.hardware
        if hw.num_threads is not None:
            torch.set_num_threads(hw.num_threads)
        check_optimizer(optimizer)
        self.task = task = task if task is not None else Classification()
        task.fit(data.train_targets, loss_fn)  # a regression's target scale; targets the loss cannot take
        task.check_loss(loss_fn, data, device)
        wrapped = task.loss(loss_fn)  # a regression's loss compares standardised targets
        class_weights = getattr(loss_fn, "class_weights", None)  # loss.class_weights, as resolved: the checkpoint's
        loss_fn = wrapped.to(device) if isinstance(wrapped, nn.Module) else wrapped  # class weights are a buffer
        set_deterministic(hw.deterministic)
        self.model, self.loss_fn, self.optimizer, self.data, self.device = model, loss_fn, optimizer, data, device
        self.options, self.max_epochs, self.accumulate = options, fit.max_epochs, fit.accumulate_grad_batches
        self.monitor, self.mode, self.skip_nonfinite = ckpt.monitor, ckpt.mode, fit.nonfinite_loss == "skip"
        self.histogram_every = options.report.histogram_every_n_epochs
        if hw.channels_last:
            model.to(memory_format=torch.channels_last)
        # Checkpoints save self.model (no "_orig_mod." keys); training and evaluation call the compiled one.
        self.net = torch.compile(model) if hw.compile else model
        averaging = options.averaging
        self.ema = make_ema(model, averaging.ema_decay, averaging.ema_warmup)  # validation, test and best.pt use it
        self.eval_model = self.ema.module if self.ema is not None else model
        self.eval_net = self.ema.module if self.ema is not None else self.net
        self.dist, self.train_net = dist, dist.for_training(self.net)
        # per-step schedules need the run's length in optimizer steps, which only the Trainer knows
        self.schedule = schedulers.bind(scheduler, optimizer, self.steps_per_epoch, fit.max_epochs)
        self.autocast = autocast_for(hw.precision, device, cache=not hw.cuda_graphs)  # a graph can't keep the cache
        self.graph = graphed_training_step(  # None unless trainer.cuda_graphs
            hw.cuda_graphs, forward=functools.partial(self._forward, net=self.train_net), model=model,
            optimizer=optimizer, scheduler=self.schedule.scheduler, grad_clip_norm=fit.grad_clip_norm, device=device,
            precision=hw.precision, accumulate_grad_batches=fit.accumulate_grad_batches,
            nonfinite_loss=fit.nonfinite_loss, world_size=dist.world_size, compile=hw.compile)
        self.scaler = torch.amp.GradScaler(device.type, enabled=hw.precision == "fp16")
        self.startup_s = self.fit_s = None  # process start -> first training step; fit()'s own time (set by fit)
        top_k = options.metrics.top_k
        self.train_metrics = task.metrics("train", data=data, device=device, top_k=top_k, full=False)
        self.eval_metrics = {split: task.metrics(split, data=data, device=device, top_k=top_k,
                                                 full=split == "test" or options.metrics.full_val_metrics,
                                                 extra=metrics) for split in ("val", "test")}
        self._require_monitored()
        self.callbacks = Callbacks(callbacks or {})
        self.state = RunState(model=model, optimizer=optimizer, schedule=self.schedule, scaler=self.scaler,
                              ema=self.ema, train_metrics=self.train_metrics, callbacks=self.callbacks,
                              monitor=ckpt.monitor, task=task, class_weights=class_weights,
                              config_yaml=config_yaml, choices=config_choices, data_identity=data.identity(), dist=dist)
        self.progress = self.state.progress
        resume = ckpt.resume
        self.run_dir = self.state.open(Path(resume).expanduser() if resume else None, Path(run_dir),
                                       ckpt.checkpoint_dir, max_epochs=fit.max_epochs,
                                       batches_per_epoch=self.batches_per_epoch)
        self.ckpt_dir = self.run_dir / ckpt.checkpoint_dir
        self.signals = StopSignals(dist, self.ckpt_dir / "last.pt")
        self.logger = logger(log_dir=self.run_dir, purge_step=self.progress.global_step + 1 if resume else None)
        self.state.trackers = self.logger  # its state (an MLflow run id) goes into the checkpoints
        if resume:
            self.logger.load_state_dict(self.state.resumed_trackers)
        self.report = RunReport(logger=self.logger, data=data, run_dir=self.run_dir, config_yaml=config_yaml,
                                device=device, dist=dist, options=options.report, channels_last=hw.channels_last,
                                limit_eval_batches=fit.limit_eval_batches)
        self.report.start(model, resumed=bool(resume))

    def fit(self) -> dict[str, float]:
        """Train from the current epoch to `max_epochs`; validate, step epoch schedules and checkpoint each epoch."""
        self.startup_s, started = seconds_since_process_start(), time.perf_counter()
        log.info("first training step %.1fs after process start (malloc: %s)", self.startup_s, allocator_in_use())
        p, ckpt = self.progress, self.options.checkpoints
        self.callbacks.on_fit_start(self)
        with self.signals.catching(lambda: f"in epoch {p.epoch + 1}"):
            for epoch in range(p.epoch, self.max_epochs):
                if p.patience_exhausted(ckpt.early_stopping_patience, self.monitor, ckpt.early_stopping_min_delta):
                    break
                start, first_batch = time.perf_counter(), p.batch_in_epoch
                train = self.train_epoch(epoch)
                val = self.evaluate(self.data.val, "val")
                seconds = time.perf_counter() - start
                p.epoch, p.batch_in_epoch = epoch + 1, 0
                self.schedule.after_epoch(val[self.monitor])
                improved = p.record(val[self.monitor], self.mode, ckpt.early_stopping_min_delta)
                samples = self.data.train.samples_between(first_batch, self.batches_per_epoch)
                speed = {"epoch/time_s": seconds, "epoch/samples_per_s": samples / seconds}
                self.logger.log_metrics({**train, **val, **speed, "epoch": p.epoch}, p.global_step)
                log.info("epoch %d/%d  %s  %.1fs  %.0f samples/s  [%.1fs since start]%s", p.epoch,
                         self.max_epochs, "  ".join(f"{k} {v:.4f}" for k, v in {**train, **val}.items()
                                                    if not is_per_class(k)), seconds,  # per class: TensorBoard's
                         speed["epoch/samples_per_s"], seconds_since_process_start(), "  (best)" if improved else "")
                self.callbacks.on_validation_end(self, {**train, **val})
                if improved:  # before last.pt: a kill between the two must not leave a last.pt whose best is unsaved
                    self.save_checkpoint("best.pt")
                self.save_checkpoint("last.pt")
                self._stop_if_signalled()  # after the last epoch too: resuming then runs just the test
        self.fit_s = time.perf_counter() - started  # this process's training, validation and checkpoints
        best = {f"best/{self.monitor}": p.best_metric, "best/epoch": p.best_epoch}
        self.callbacks.on_fit_end(self, best)
        return best

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split, or the rest of it when resumed mid-epoch.

        Reads values back from the device only every `log_every` optimizer steps and at checkpoints.
        """
        self.model.train()
        self.data.train.set_epoch(epoch)
        p, batches, fit = self.progress, self.batches_per_epoch, self.options.fit
        every = self.options.checkpoints.checkpoint_every_n_steps
        bar = tqdm(total=batches, initial=p.batch_in_epoch, desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True)
        for i, (images, targets) in zip(range(p.batch_in_epoch, batches), self.data.train.iter_from(p.batch_in_epoch)):
            stepping = not (i + 1) % self.accumulate or i + 1 == batches
            # DDP all-reduces gradients in every backward; accumulating batches only need the last one's.
            sync = (contextlib.nullcontext() if stepping or not self.dist.active else self.train_net.no_sync())
            with sync:
                self._forward_backward(images, targets, epoch, i)
            bar.update()
            if not stepping:
                continue  # accumulate gradients over `accumulate` batches per optimizer step
            if i + 1 == batches and self.histogram_every and (epoch + 1) % self.histogram_every == 0:
                # nothing reads the weights before this check (a sync once an epoch); batch i's step is not taken yet
                self._check_finite(epoch, batches_done=i + 1, steps_done=p.global_step + 1)
                # the epoch's last gradients, before the step applies and clears them; unscaled under fp16
                self.logger.log_histograms(self.model, p.global_step + 1, self.scaler.get_scale())
            used = self._optimizer_step()
            p.batch_in_epoch = i + 1
            self.callbacks.on_step_end(self)
            if p.global_step % fit.log_every_n_steps == 0 and self.train_metrics.has_pending:
                mean_loss = self._check_finite(epoch)  # the one host sync per log interval
                self.logger.log_metrics({"train/loss": mean_loss, **used}, p.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                self.train_metrics.flush()
            if i + 1 < batches:  # the epoch's end has its own checkpoint and signal check
                if every and p.global_step % every == 0:
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
            metrics["train/skipped_batches"] = float(p.skipped_batches)
        return metrics

    @property
    def batches_per_epoch(self) -> int:
        return min(len(self.data.train), self.options.fit.limit_train_batches or len(self.data.train))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (what per-step schedules count)."""
        return math.ceil(self.batches_per_epoch / self.accumulate)

    def _forward(self, images: torch.Tensor, targets: torch.Tensor,
                 net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_pass(self.net if net is None else net, self.loss_fn, images, targets,
                            channels_last=self.options.hardware.channels_last, autocast=self.autocast)

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, i: int) -> None:
        """Forward and backward of batch `i`; its loss and logits go to the epoch's metrics. Under
        trainer.cuda_graphs one replay does both and the optimizer step (which `_optimizer_step` then skips)."""
        if self.graph is not None:
            logits, loss = self.graph(images, targets)
        else:
            logits, loss = self._forward(images, targets, self.train_net)
            if self.skip_nonfinite and not torch.isfinite(loss):  # a host sync per batch, only in skip mode
                self.progress.skipped_batches += 1
                log.warning("epoch %d, batch %d: loss is %s; batch skipped", epoch + 1, i + 1, float(loss.detach()))
                return
            self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()
        self.train_metrics.add(loss, logits, targets)

    def _optimizer_step(self) -> dict[str, float]:
        """Clip, step (through the fp16 scaler when on), zero the grads and step per-batch schedules.
        Returns the `lr` (and `momentum`: SGD's momentum or Adam's beta1, if any) this step used."""
        clip = self.options.fit.grad_clip_norm
        # only skip mode can leave no gradient (every batch skipped); walking the parameters costs ~13 us a step
        if not self.skip_nonfinite or any(p.grad is not None for p in self.model.parameters()):
            if self.graph is None:  # a CUDA graph's replay has taken the step
                if clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        group = self.optimizer.param_groups[0]
        momentum = group.get("momentum", group.get("betas", (None,))[0])
        used = {"lr": group["lr"], **({"momentum": momentum} if momentum is not None else {})}
        self.schedule.after_batch()
        self.progress.global_step += 1
        return used

    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        """Loss, accuracy and macro F1 of the model over `loader`, with keys `<prefix>/loss` etc.; the report
        draws the confusion matrix and, for validation, the misclassified images."""
        self.dist.broadcast_module(self.eval_model)  # rank 0's: DDP syncs batch-norm buffers only in forward (ema.py)
        self.eval_net.eval()
        measured = self.eval_metrics[prefix]
        metrics = evaluate(functools.partial(self._forward, net=self.eval_net), loader, measured, prefix,
                           self.options.fit.limit_eval_batches)
        self.report.evaluation(measured, loader, prefix, self.progress.global_step)
        return metrics

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (else the current weights) on the test split; write metrics.json.

        A SIGINT/SIGTERM stops it at once: training is over and last.pt holds it, so a resume of that
        checkpoint runs just the test (see RunState.resume)."""
        with self.signals.catching(lambda: "during the test", at_once=True):
            best = self.ckpt_dir / "best.pt"
            if self.dist.is_main and best.is_file():  # its "model" is the EMA's weights when EMA is on
                self.eval_model.load_state_dict(load_checkpoint(best)["model"])  # evaluate() sends it to every rank
                self.logger.log_artifact(best)
            metrics = self.evaluate(self.data.test, "test")
            measured = self.eval_metrics["test"]
            confusion = measured.last_confusion.cpu() if isinstance(measured, EpochMetrics) else None  # rows true
            self.report.test_results(self.eval_model, metrics, confusion, self.monitor, self.progress,
                                     {"startup_s": self.startup_s, "fit_s": self.fit_s})
            self.callbacks.on_test_end(self, metrics)
            self.logger.close()
            self.state.close()  # the run is complete: another process may train on from it
            return metrics

    @property
    def result_keys(self) -> tuple[str, ...]:
        """What a finished run reports: `test()`'s metrics, then `best/<monitor>` from `fit()`."""
        return (*self.eval_metrics["test"].names("test"), f"best/{self.monitor}")

    def save_checkpoint(self, name: str) -> Path:
        """Atomically write everything needed to continue this run to `<checkpoint_dir>/<name>` (rank 0; with
        several processes every rank must call it). Refuses non-finite weights, so no checkpoint (best.pt
        included) ever holds a diverged model."""
        self._require_finite_weights(f"{name} not written, the last good checkpoint is kept")
        path = self.ckpt_dir / name
        self.state.save(path)
        # The checkpoint says "everything up to this step is done": make the logged scalars as durable, so a
        # kill after it loses no TensorBoard steps before it (the resumed run purges the ones after).
        self.logger.flush()
        self.callbacks.on_checkpoint(self, path)
        return path

    def _require_monitored(self) -> None:
        """trainer.monitor must be a metric that validation measures (the per-class ones, AUROC and ECE only
        with trainer.full_val_metrics)."""
        measured = self.eval_metrics["val"].names("val")
        if self.monitor not in measured:
            named = [m for m in measured if not is_per_class(m)]
            more = ("" if self.options.metrics.full_val_metrics or not isinstance(self.task, Classification) else
                    "; val/auroc, val/ece and per class val/<precision|recall|f1|auroc>/<class> with "
                    "trainer.full_val_metrics=true")
            raise UserError(f"trainer.monitor={self.monitor}: validation does not measure it; use one of "
                            f"{', '.join(named)}{more}")
        direction = self.task.direction(self.monitor)  # None: a metric of your own, either way
        lower_is_better, higher_is_better = direction == "min", direction == "max"
        if (lower_is_better and self.mode == "max") or (higher_is_better and self.mode == "min"):  # not a metric's
            raise UserError(f"trainer.mode={self.mode} with trainer.monitor={self.monitor}: "  # of your own: yours
                            f"{'lower' if lower_is_better else 'higher'} is better for it; set trainer.mode="
                            f"{'min' if lower_is_better else 'max'}")

    def _require_finite_weights(self, consequence: str = "stopped before anything reads them") -> None:
        p = self.progress
        require_finite_weights(self.model, f"by step {p.global_step} of epoch {p.epoch + 1}", consequence)

    def _check_finite(self, epoch: int, batches_done: int | None = None, steps_done: int | None = None) -> float:
        """Mean of the training losses not yet flushed (a host sync); raise naming the first non-finite batch.
        `batches_done`/`steps_done`: where the pending losses run up to, when not yet counted in `progress`."""
        p = self.progress
        return mean_finite_loss(self.train_metrics.pending_losses(), epoch,
                                p.batch_in_epoch if batches_done is None else batches_done,
                                p.global_step if steps_done is None else steps_done, self.accumulate)

    def _stop_if_signalled(self, epoch: int | None = None) -> None:
        """After a stop signal: checkpoint mid-epoch (`epoch` given) or rely on the epoch's, then raise."""
        step = self.progress.global_step
        signum = self.signals.requested(ranks_may_agree=epoch is None or step % self.options.fit.log_every_n_steps == 0)
        if signum is None:
            return
        if epoch is not None:
            self._check_finite(epoch)
            self.save_checkpoint("last.pt")
        where = f"in epoch {epoch + 1}" if epoch is not None else f"after epoch {self.progress.epoch}"
        raise TrainingInterrupted(signum, self.ckpt_dir / "last.pt", f"{where} at step {step}")
