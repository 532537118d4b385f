"""What one training or evaluation step needs: its precision and autocast, the forward pass with a channels-last
input, and an optimizer and loss that can train (torch accepts some that cannot)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager

import torch
from torch import nn

from trainer.errors import UserError, shown

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse what torch accepts but cannot train with: lr=0 (learns nothing), lr=inf (weights gone at the first
    step). The loss is the task's to check (trainer.tasks.Task.check_loss)."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise UserError(f"optimizer.lr={lrs[0] if len(set(lrs)) == 1 else lrs}: must be a finite number > 0")


def check_loss(loss_fn: nn.Module, num_classes: int, device: torch.device) -> None:
    """Refuse loss settings that fail only when the loss is called (label_smoothing=2): one call on a blank batch."""
    try:
        with torch.no_grad():  # not a training batch
            loss_fn(torch.zeros(2, num_classes, device=device), torch.zeros(2, dtype=torch.long, device=device))
    except (RuntimeError, ValueError, TypeError) as e:  # TypeError: loss.label_smoothing=yes
        raise UserError(f"loss={type(loss_fn).__name__}: {' '.join(str(e).split())}") from None
