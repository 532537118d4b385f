"""The Trainer's settings (configs/trainer/*.yaml) checked before anything is built: one line per bad value.

Hand-written rather than a structured-config schema: each rule here is a range or a combination (an integer
>= 1, fp16 only on CUDA, skip only in one process), which a type cannot say, and each message names the
allowed values in the same line. Measured with a dataclass schema for `trainer` in Hydra's ConfigStore:
`trainer.max_epochs=abc` gave "Value 'abc' of type 'str' could not be converted to Integer / full_key: ... /
object_type=..." (three lines, no allowed range), and `trainer.max_epochs=0` passed it, so the checks below would
stay anyway.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager

import torch
from torch import nn

from trainer.distributed import Dist
from trainer.errors import UserError, is_number, require_bool, require_int, shown

MONITORABLE = ("val/loss", "val/acc", "val/f1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_POLICIES = ("error", "skip")


def check_settings(*, max_epochs: int, log_every_n_steps: int, accumulate_grad_batches: int,
                   misclassified_images: int, optional_counts: dict[str, int | None], precision: str, monitor: str,
                   mode: str, nonfinite_loss: str, early_stopping_min_delta: float, grad_clip_norm: float | None,
                   switches: dict[str, bool], device: torch.device, dist: Dist) -> None:
    """Raise UserError naming the first bad trainer setting. `optional_counts`: settings that are null or an
    integer >= 1, by name; `switches`: settings that are true or false (a string would read as true)."""
    for key, value in switches.items():
        require_bool(f"trainer.{key}", value)
    require_int("trainer.max_epochs", max_epochs, 1)
    require_int("trainer.log_every_n_steps", log_every_n_steps, 1)
    require_int("trainer.accumulate_grad_batches", accumulate_grad_batches, 1)
    require_int("trainer.misclassified_images", misclassified_images, 0)
    for key, value in optional_counts.items():
        if value is not None:
            require_int(f"trainer.{key}", value, 1)
    check_precision(precision)
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"trainer.precision=fp16 needs CUDA (it trains with a gradient scaler); on {device.type} "
                        "use bf16 or fp32")
    if monitor not in MONITORABLE:
        raise UserError(f"trainer.monitor={monitor!r}: not a validation metric; use one of {', '.join(MONITORABLE)}")
    if mode not in ("min", "max"):
        raise UserError(f"trainer.mode={mode!r}: use min or max")
    if nonfinite_loss not in NONFINITE_POLICIES:
        raise UserError(f"trainer.nonfinite_loss={nonfinite_loss!r}: use error or skip")
    if nonfinite_loss == "skip" and dist.world_size > 1:  # a rank skipping a backward would leave the others waiting
        raise UserError("trainer.nonfinite_loss=skip does not work with several processes (torchrun); use error")
    if not (is_number(early_stopping_min_delta) and early_stopping_min_delta >= 0):
        raise UserError(f"trainer.early_stopping_min_delta={shown(early_stopping_min_delta)}: must be a number >= 0")
    if grad_clip_norm is not None and not (is_number(grad_clip_norm) and grad_clip_norm > 0):
        raise UserError(f"trainer.grad_clip_norm={shown(grad_clip_norm)}: must be null or a number > 0")


def check_precision(precision: object) -> str:
    """Return `precision` if it is one of PRECISIONS, else raise UserError naming it (eval.py reads it from a file)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise UserError(f"trainer.precision={shown(precision)}: use one of {', '.join(PRECISIONS)}")
    return precision


def autocast_for(precision: str, device: torch.device, cache: bool = True) -> Callable[[], ContextManager]:
    """A context factory for forward passes at `precision` on `device`: torch.autocast for bf16 and fp16, a no-op
    for fp32 (entering a disabled torch.autocast would cost ~30 us a step on CPU). `cache=False` for a forward
    pass that a CUDA graph captures: autocast's cache of cast weights would be freed outside the graph."""
    dtype = PRECISIONS[precision]
    return (functools.partial(torch.autocast, device.type, dtype=dtype, cache_enabled=cache) if dtype
            else contextlib.nullcontext)


def forward_pass(net: nn.Module, loss_fn: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                 channels_last: bool, autocast: Callable[[], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and loss of one batch as training, validation, the test and eval.py all compute them: the input in
    the model's memory format, the forward pass and the loss under `autocast` (see autocast_for)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) stored as NHWC
    with autocast():
        logits = net(images)  # (B, classes)
        return logits, loss_fn(logits, targets)


def check_optimizer_and_loss(optimizer: torch.optim.Optimizer, loss_fn: nn.Module, num_classes: int,
                             device: torch.device) -> None:
    """Refuse what torch accepts but cannot train with: lr=0 (learns nothing), lr=inf (weights gone at the first
    step), and loss settings that fail only when the loss is called (label_smoothing=2)."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise UserError(f"optimizer.lr={lrs[0] if len(set(lrs)) == 1 else lrs}: must be a finite number > 0")
    check_loss(loss_fn, num_classes, device)


def check_loss(loss_fn: nn.Module, num_classes: int, device: torch.device) -> None:
    """Refuse loss settings that fail only when the loss is called (label_smoothing=2): one call on a blank batch."""
    try:
        with torch.no_grad():  # not a training batch
            loss_fn(torch.zeros(2, num_classes, device=device), torch.zeros(2, dtype=torch.long, device=device))
    except (RuntimeError, ValueError, TypeError) as e:  # TypeError: loss.label_smoothing=yes
        raise UserError(f"loss={type(loss_fn).__name__}: {' '.join(str(e).split())}") from None
