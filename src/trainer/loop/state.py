"""Where a run is, and everything needed to continue it exactly: one object whose `state_dict()` is the checkpoint."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from trainer.distributed import Dist
from trainer.errors import UserError
from trainer.loop.callbacks import Callbacks
from trainer.loop.metrics import EpochMetrics, to_cpu
from trainer.loop.schedulers import Schedule
from trainer.report.tracker import Tracker
from trainer.run.changes import config_changes, require_same_data
from trainer.run.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.run.files import lock_run_dir, remove_stale_temps, require_free_space
from trainer.run.untrusted import load_json
from trainer.tasks import Task, task_name

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("last.pt", "best.pt")  # the files a run writes in its checkpoint directory


def _finished_epochs(run_dir: Path) -> int | None:
    """The epochs a run had trained when it wrote its test result (metrics.json), or None: not finished.
    A metrics.json that is not a small regular file (a FIFO, a link to /dev/zero) is refused (UserError)."""
    metrics = run_dir / "metrics.json"
    if not os.path.lexists(metrics):
        return None
    try:
        return int(load_json(metrics)["epochs"])
    except (KeyError, TypeError, ValueError):  # one this run's test did not write
        return None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def claim_checkpoint_dir(ckpt_dir: Path, run_dir: Path, resumed: Path | None) -> BinaryIO | None:
    """Lock a checkpoint directory outside the run directory (an absolute trainer.checkpoint_dir, which two runs
    may be given) for as long as this run writes into it, and refuse it if it holds another run's checkpoints
    (the second run would overwrite the first's best.pt and last.pt), unless this run continues a checkpoint of
    that directory. Returns the lock to hold. One inside the run directory is the run's own: Hydra gives each
    run a new directory, whose lock (lock_run_dir) covers it, and Trainers built one after another in one
    process (tests, notebooks) may share it."""
    if _inside(ckpt_dir, run_dir):
        return None
    lock = lock_run_dir(ckpt_dir, in_use="another run writing its checkpoints there (the same trainer."
                        "checkpoint_dir); give each run its own")
    theirs = [name for name in CHECKPOINT_NAMES if os.path.lexists(ckpt_dir / name)]
    if theirs and not (resumed is not None and resumed.resolve().parent == ckpt_dir.resolve()):
        if lock is not None:  # Windows: no lock
            lock.close()
        raise UserError(f"trainer.checkpoint_dir={ckpt_dir}: it holds another run's checkpoints "
                        f"({', '.join(theirs)}), which this run would overwrite; give each run its own directory (a "
                        f"relative one is inside the run directory), or continue that run with "
                        f"trainer.resume={ckpt_dir / theirs[0]}")
    return lock


def _require_new(run_dir: Path, checkpoint_dir: str) -> None:
    """Refuse to start a new run in a directory that holds a run's checkpoints or its test result: the new run
    would overwrite them. The commands give every run a new directory (Hydra); a Python caller gives its own,
    and may give the same one twice. A checkpoint directory outside the run directory is claim_checkpoint_dir's."""
    ckpt_dir = run_dir / checkpoint_dir
    found = [ckpt_dir / name for name in CHECKPOINT_NAMES if _inside(ckpt_dir, run_dir) and os.path.lexists(
        ckpt_dir / name)] + [p for p in (run_dir / "metrics.json",) if os.path.lexists(p)]
    if found:
        raise UserError(f"run directory {run_dir} already holds a run ({found[0]}), which a new run there would "
                        f"overwrite: give each run its own directory, or continue that run with its checkpoint "
                        f"(resume=.../last.pt)")


@dataclass
class Progress:
    """The run's counters and its best validation value so far."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of epoch `epoch` already trained (non-zero only mid-epoch)
    global_step: int = 0  # optimizer steps taken
    skipped_batches: int = 0  # with trainer.nonfinite_loss=skip
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0  # by more than trainer.early_stopping_min_delta

    def improves(self, value: float, mode: str, margin: float = 0.0) -> bool:
        """Whether `value` of the monitored metric beats the best so far by more than `margin`."""
        if not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric + margin if mode == "max" else value < self.best_metric - margin

    def record(self, value: float, mode: str, min_delta: float) -> bool:
        """Count epoch `epoch`'s value of the monitored metric; return whether it is the best so far."""
        improved = self.improves(value, mode)
        significant = self.improves(value, mode, margin=min_delta)
        self.epochs_without_improvement = 0 if significant else self.epochs_without_improvement + 1
        if improved:
            self.best_metric, self.best_epoch = value, self.epoch
        return improved

    def patience_exhausted(self, patience: int | None, monitor: str, min_delta: float) -> bool:
        """Whether early stopping ends the run now (`patience`: epochs without an improvement by > min_delta)."""
        if patience is None or self.epochs_without_improvement < patience:
            return False
        log.info("early stopping after epoch %d: %s has not improved by more than %g for %d epochs (best %.4f at "
                 "epoch %s)", self.epoch, monitor, min_delta, self.epochs_without_improvement, self.best_metric,
                 self.best_epoch)
        return True


class RunState:
    """The model, optimizer, schedule, gradient scaler, unfinished epoch metrics, progress and RNG states of a
    run, with the config and data it was started on. `state_dict()` is a checkpoint: a plain dict of tensors
    and primitives that `torch.load(weights_only=True)` reads.

    Under torchrun each rank holds its own; `state_dict()` gathers the ranks' unfinished epoch metrics, so every
    rank must call it. The RNG states are this rank's: all ranks share the seed and draw alike.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 scaler: torch.amp.GradScaler, ema: AveragedModel | None, train_metrics: EpochMetrics,
                 callbacks: Callbacks, monitor: str, task: Task, class_weights: list[float] | None,
                 config_yaml: str, choices: dict[str, str | None] | None, data_identity: dict, dist: Dist) -> None:
        self.model, self.optimizer, self.schedule, self.scaler, self.ema = model, optimizer, schedule, scaler, ema
        self.train_metrics, self.callbacks, self.monitor, self.dist = train_metrics, callbacks, monitor, dist
        self.task, self.class_weights = task, class_weights
        self.config_yaml, self.choices, self.data_identity = config_yaml, choices, data_identity
        self.progress = Progress()
        self.trackers: Tracker = Tracker(".")  # the Trainer's, once built (it needs the run directory)
        self.resumed_trackers: dict = {}  # their state in the resumed checkpoint
        self._lock = None  # the run directory's, while this run trains in it (open)
        self._ckpt_lock = None  # the checkpoint directory's, when it is outside the run directory

    def state_dict(self) -> dict:
        train_metrics = self.dist.all_gather_object(to_cpu(self.train_metrics.state_dict()))  # one per rank
        p = self.progress
        # "model" holds the weights to use (eval, predict, export read it): the EMA's when it is on, and then
        # "train_model" the trained weights that a resume continues from.
        weights = ({"model": self.ema.module.state_dict(), "train_model": self.model.state_dict(),
                    "ema_updates": self.ema.n_averaged.clone()} if self.ema is not None
                   else {"model": self.model.state_dict()})
        return {
            **weights, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "global_step": p.global_step,
            "world_size": self.dist.world_size, "train_metrics_of_ranks": train_metrics,
            "train_metrics": train_metrics[0], "skipped_batches": p.skipped_batches,
            "best_metric": p.best_metric, "best_epoch": p.best_epoch, "monitor": self.monitor,
            "epochs_without_improvement": p.epochs_without_improvement,
            "rng": rng_state(), "trackers": self.trackers.state_dict(), "callbacks": self.callbacks.state_dict(),
            "config": self.config_yaml, "choices": self.choices, "data": self.data_identity,
            "task": self.task.state_dict(), "class_weights": self.class_weights}

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically (rank 0; every rank must call it)."""
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(path, state)

    def open(self, resumed: Path | None, run_dir: Path, checkpoint_dir: str, *, max_epochs: int,
             batches_per_epoch: int) -> Path:
        """The run directory (a checkpoint inside one continues that run there; else `run_dir`), locked by rank 0
        for as long as this run trains in it, from before a resume reads its files; then the resume, if any."""
        if resumed:
            run_dir = next((d for d in (resumed.parent, resumed.parent.parent) if (d / ".hydra").is_dir()), run_dir)
        elif self.dist.is_main:
            _require_new(run_dir, checkpoint_dir)
        if self.dist.is_main:
            self._lock = lock_run_dir(run_dir)
            self._ckpt_lock = claim_checkpoint_dir(run_dir / checkpoint_dir, run_dir, resumed)
        if resumed:
            self.resume(resumed, max_epochs=max_epochs, batches_per_epoch=batches_per_epoch, run_dir=run_dir,
                        checkpoint_dir=checkpoint_dir)
        if self.dist.is_main:  # a full disk is found now, not after the first epoch
            self.require_room(run_dir / checkpoint_dir)
        return run_dir

    def close(self) -> None:
        """Release the run directory (another process may train on from it)."""
        for lock in (self._lock, self._ckpt_lock):
            if lock is not None:
                lock.close()
        self._lock = self._ckpt_lock = None

    def require_room(self, checkpoint_dir: Path) -> None:
        """Raise OutputError now, not after the first epoch, if the disk cannot hold the run's checkpoints."""
        size = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) + 2**20  # weights, 2 optimizer
        require_free_space(checkpoint_dir, 3 * size, f"this run's checkpoints (last.pt and best.pt of about "
                           f"{size / 2**20:.1f} MiB each, and a temporary copy while one is written)")

    def load_state_dict(self, state: dict, where: Path | str = "the checkpoint") -> None:
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:  # a checkpoint written without EMA starts the average at its weights
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.copy_(state.get("ema_updates", torch.tensor(0)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        p = self.progress
        p.epoch, p.batch_in_epoch, p.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        saved_world = state.get("world_size", 1)  # checkpoints before DDP support: single-process
        self.train_metrics.load_state_dict(state["train_metrics_of_ranks"][self.dist.rank] if saved_world > 1
                                           else state["train_metrics"])
        p.skipped_batches = state["skipped_batches"]
        # The best so far counts only if it was measured on the same kind of weights: raw and averaged (EMA)
        # validation values do not compare, so turning EMA on or off starts best.pt (and early stopping) afresh.
        same_ema = ("ema_updates" in state) == (self.ema is not None)
        if state["monitor"] == self.monitor and same_ema:
            p.best_metric, p.best_epoch = state["best_metric"], state["best_epoch"]
            p.epochs_without_improvement = state["epochs_without_improvement"]
        elif not same_ema:
            log.info("resume: trainer.ema_decay turned %s; best.pt is chosen afresh from the next validation",
                     "on" if self.ema is not None else "off")
        self.task.load_fitted(state.get("task"), where)  # an embedding's centroids, until the next validation
        set_rng_state(state["rng"], where)
        trackers = state.get("trackers", {})  # checkpoints before trackers had state: none
        if not (isinstance(trackers, dict) and all(isinstance(v, dict) for v in trackers.values())):
            raise UserError(f"{where}: its tracker state is not a table of tables; this framework writes none such")
        self.resumed_trackers = trackers
        callbacks = state.get("callbacks", {})
        if not (isinstance(callbacks, dict) and all(isinstance(v, dict) for v in callbacks.values())):
            raise UserError(f"{where}: its callback state is not a table of tables; this framework writes none such")
        for name in self.callbacks.load_state_dict(callbacks):
            log.warning("resume: %s holds the state of callback %s, which this run does not have; it is dropped",
                        where, name)

    def resume(self, path: Path, *, max_epochs: int, batches_per_epoch: int, run_dir: Path,
               checkpoint_dir: str) -> None:
        """Restore from `path`, refusing in one line what cannot continue exactly, and continue in `run_dir`."""
        state = load_checkpoint(path)
        require_same_data(state["data"], self.data_identity, path)  # before the config lines: a refusal is one line
        trained = task_name(state.get("task"))
        if trained != self.task.name:
            raise UserError(f"trainer.resume={str(path)!r} was trained for task={trained}, not task={self.task.name}; "
                            f"resume it with task={trained}, or start a new run")
        saved_world = state.get("world_size", 1)
        if state["batch_in_epoch"] and saved_world != self.dist.world_size:
            raise UserError(f"trainer.resume={str(path)!r} stopped mid-epoch in a run of {saved_world} process(es); "
                            f"resume it with {saved_world}, not {self.dist.world_size} (an epoch-end checkpoint, "
                            "e.g. best.pt, resumes with any number)")
        for change in config_changes(state["config"], self.config_yaml, mid_epoch=state["batch_in_epoch"] > 0):
            log.info("resume: config changed, %s", change)
        finished = _finished_epochs(run_dir)  # a tested run: any of its checkpoints (best.pt too) must train past it
        if finished is not None and max_epochs <= finished:
            raise UserError(f"trainer.resume={str(path)!r}: its run finished {finished} epoch{'s' * (finished != 1)} "
                            f"and was tested; raise trainer.max_epochs (now {max_epochs}) above {finished} to train on")
        if state["epoch"] >= max_epochs:
            log.info("resume: training ended at epoch %d, but the run has no test result; running just the test",
                     state["epoch"])
        if state["batch_in_epoch"] > batches_per_epoch:
            raise UserError(f"trainer.resume={str(path)!r} stopped after batch {state['batch_in_epoch']} of its "
                            f"epoch, but an epoch now has {batches_per_epoch} batches")
        self.load_state_dict(state, path)
        if self.dist.is_main:  # left by a kill during a checkpoint write; other programs' files are left alone
            names = "|".join(re.escape(name) for name in CHECKPOINT_NAMES)
            # no grace period: this run's lock on the directory (open) keeps every other writer of these names out
            for stale in remove_stale_temps(run_dir / checkpoint_dir, names, grace_s=0):
                log.info("resume: removed %s, left by a checkpoint write that was killed", stale)
        p = self.progress
        where = (f"epoch {p.epoch + 1}, after batch {p.batch_in_epoch}" if p.batch_in_epoch
                 else f"the start of epoch {p.epoch + 1}")
        log.info("resumed %s at %s (step %d); continuing in %s", path, where, p.global_step, run_dir)
