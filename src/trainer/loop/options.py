"""The Trainer's settings (configs/trainer/default.yaml), grouped by what each governs.

The YAML stays flat (`trainer.max_epochs=3`); `TrainerOptions.from_settings` sorts its keys into these objects.
Each object checks its own ranges and cross-field rules in `validate()`, with one line per bad value that names
the key as the command line spells it. The defaults are the YAML's: from Python, start from
`trainer.defaults("trainer", ...)` (docs/python_api.md).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trainer.distributed import Dist
from trainer.errors import UserError, is_number, require_bool, require_int, shown
from trainer.loop.metrics import MetricOptions
from trainer.loop.step import check_precision
from trainer.report.run_report import ReportOptions

NONFINITE_POLICIES = ("error", "skip")
MODES = ("min", "max")  # the closed choices here are also the schema's enums (trainer/cli/schema.py)


@dataclass(frozen=True)
class Fit:
    """How long a run trains and how each optimizer step is taken.

    max_epochs: epochs to train (a resume continues to it). accumulate_grad_batches: batches per optimizer
    step. grad_clip_norm: clip the global gradient norm to it (None: off). nonfinite_loss: "error" stops,
    naming the batch; "skip" drops such batches (one host sync a step; one process only). log_every_n_steps:
    how often train/loss and the learning rate are logged: the one host sync per interval.
    limit_train_batches / limit_eval_batches: only the first N batches of each epoch / of val and test.
    """

    max_epochs: int
    accumulate_grad_batches: int
    grad_clip_norm: float | None
    nonfinite_loss: str
    log_every_n_steps: int
    limit_train_batches: int | None
    limit_eval_batches: int | None

    def validate(self, dist: Dist) -> None:
        require_int("trainer.max_epochs", self.max_epochs, 1)
        require_int("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        require_int("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _optional_count("limit_train_batches", self.limit_train_batches)
        _optional_count("limit_eval_batches", self.limit_eval_batches)
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise UserError(f"trainer.nonfinite_loss={self.nonfinite_loss!r}: use error or skip")
        if self.nonfinite_loss == "skip" and dist.world_size > 1:  # a rank skipping a backward leaves the rest waiting
            raise UserError("trainer.nonfinite_loss=skip does not work with several processes (torchrun); use error")
        if self.grad_clip_norm is not None and not (is_number(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise UserError(f"trainer.grad_clip_norm={shown(self.grad_clip_norm)}: must be null or a number > 0")


@dataclass(frozen=True)
class Checkpoints:
    """Where checkpoints go, which one is best, and when training stops early.

    checkpoint_dir: relative to the run directory (or absolute). checkpoint_every_n_steps: also write last.pt
    every N optimizer steps (None: at epoch ends only). resume: a checkpoint to continue exactly, or None.
    monitor / mode: the validation metric that picks best.pt and drives early stopping and the plateau
    schedule, and whether higher ("max") or lower ("min") is better. early_stopping_patience: stop after N epochs
    without an improvement larger than early_stopping_min_delta (None: never).
    """

    checkpoint_dir: str
    checkpoint_every_n_steps: int | None
    resume: str | None
    monitor: str
    mode: str
    early_stopping_patience: int | None
    early_stopping_min_delta: float

    def validate(self) -> None:
        _optional_count("checkpoint_every_n_steps", self.checkpoint_every_n_steps)
        _optional_count("early_stopping_patience", self.early_stopping_patience)
        if not (isinstance(self.monitor, str) and self.monitor.startswith("val/")):  # which ones: the Trainer's
            given = self.monitor if isinstance(self.monitor, str) else shown(self.monitor)
            raise UserError(f"trainer.monitor={given}: not a validation metric; use val/<metric>, "
                            "e.g. val/acc or val/loss")
        if self.mode not in MODES:
            raise UserError(f"trainer.mode={self.mode!r}: use min or max")
        delta = self.early_stopping_min_delta
        if not (is_number(delta) and delta >= 0):
            raise UserError(f"trainer.early_stopping_min_delta={shown(delta)}: must be a number >= 0")


@dataclass(frozen=True)
class Hardware:
    """How the device computes: speed and repeatability, never what is learned.

    precision: "fp32", "bf16" (autocast) or "fp16" (CUDA only, with a gradient scaler). compile: torch.compile
    the model. channels_last: NHWC model and input. cuda_graphs: capture each training step as a CUDA graph
    (docs/performance.md). deterministic: bitwise-repeatable kernels. num_threads: CPU threads for torch ops
    (None: torch's default).
    """

    precision: str
    compile: bool
    channels_last: bool
    cuda_graphs: bool
    deterministic: bool
    num_threads: int | None

    def validate(self, device: torch.device) -> None:
        for key in ("compile", "channels_last", "cuda_graphs", "deterministic"):
            require_bool(f"trainer.{key}", getattr(self, key))
        _optional_count("num_threads", self.num_threads)
        check_precision(self.precision)
        if self.precision == "fp16" and device.type != "cuda":
            raise UserError(f"trainer.precision=fp16 needs CUDA (it trains with a gradient scaler); on "
                            f"{device.type} use bf16 or fp32")


@dataclass(frozen=True)
class Averaging:
    """An exponential moving average of the weights, which validation, the test, best.pt and exports then use.

    ema_decay: e.g. 0.999 (None: off). ema_warmup: the n-th update averages with min(decay, (1 + n) / (10 + n)).
    """

    ema_decay: float | None
    ema_warmup: bool


@dataclass(frozen=True)
class TrainerOptions:
    """Every setting of the Trainer, in its groups; `report` holds what only the report reads."""

    fit: Fit
    checkpoints: Checkpoints
    hardware: Hardware
    averaging: Averaging
    metrics: MetricOptions
    report: ReportOptions

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TrainerOptions:
        """The options from the flat keys of configs/trainer/*.yaml (`device`, read by the composition root, and
        `_target_` are passed over). A key no group has, or one missing, is refused in one line."""
        given = {k: v for k, v in settings.items() if k not in ("device", "_target_")}
        built = {}
        for name, kind in typing.get_type_hints(cls).items():  # fit: Fit, checkpoints: Checkpoints, ...
            keys = [field.name for field in dataclasses.fields(kind)]
            missing = [k for k in keys if k not in given]
            if missing:
                raise UserError(f"trainer.{missing[0]} is missing: the trainer settings need it "
                                '(start from trainer.defaults("trainer") in Python)')
            built[name] = kind(**{k: given.pop(k) for k in keys})
        if given:
            raise UserError(f"trainer.{sorted(given)[0]}: not a trainer setting")
        return cls(**built)

    def validate(self, device: torch.device, dist: Dist) -> None:
        """Raise UserError naming the first bad setting."""
        self.hardware.validate(device)
        self.fit.validate(dist)
        self.checkpoints.validate()
        self.metrics.validate()
        self.report.validate()


def _optional_count(key: str, value: object) -> None:
    if value is not None:
        require_int(f"trainer.{key}", value, 1)
