"""NaN and infinity in training: found at the host syncs the loop already makes, and named to the batch."""

from __future__ import annotations

import math

import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN or infinite."""


def mean_finite_loss(losses: torch.Tensor, epoch: int, batches_done: int, steps_done: int, accumulate: int) -> float:
    """The mean of `losses`, (k,), the per-batch training losses of the epoch's batches up to `batches_done`, in
    order (a host sync); NaN when there are none. Raise NonFiniteLossError naming the first non-finite batch and
    its optimizer step (`steps_done`: the run's steps up to that batch, `accumulate` batches a step)."""
    if not losses.numel():
        return math.nan
    mean = float(losses.mean())
    if not math.isfinite(mean):
        first = int((~torch.isfinite(losses)).nonzero()[0])
        batch = batches_done - losses.numel() + first  # 0-based, within the epoch
        step = steps_done - ((batches_done - 1) // accumulate - batch // accumulate)
        raise NonFiniteLossError(f"training loss is {float(losses[first])} at epoch {epoch + 1}, batch "
                                 f"{batch + 1} (optimizer step {step}); lower optimizer.lr, set "
                                 "trainer.grad_clip_norm, or skip such batches with trainer.nonfinite_loss=skip")
    return mean


def require_finite_weights(model: nn.Module, where: str, consequence: str) -> None:
    """Raise NonFiniteLossError if a weight is NaN or infinite (one host sync). `where`: "by step S of epoch E"."""
    params = [p.detach() for p in model.parameters()]
    if not torch.stack([p.isfinite().all() for p in params]).all():
        bad = next(n for n, p in model.named_parameters() if not p.isfinite().all())
        raise NonFiniteLossError(f"weights became non-finite ({bad}) {where}; {consequence}; lower optimizer.lr or "
                                 "set trainer.grad_clip_norm")
