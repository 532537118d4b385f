"""An exponential moving average of the weights (`trainer.ema_decay`), which validation, test, best.pt and
exports use in place of the trained weights.

It is torch's `AveragedModel` (parameters and buffers, so batch-norm statistics are averaged too), updated
after every optimizer step. Only the decay is ours: with `trainer.ema_warmup`, step n uses
min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the random initial weights.
Under torchrun every rank averages its own copy. The parameters are equal on every rank (DDP averages the
gradients), but batch-norm statistics are each rank's own between DDP's syncs, so the Trainer sends rank 0's
average to every rank before each evaluation: every rank validates and tests the average best.pt holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from trainer.errors import UserError, require_bool


def make_ema(model: nn.Module, decay: float | None, warmup: bool) -> AveragedModel | None:
    """The average of `model`'s weights, or None when `decay` is null (EMA off)."""
    require_bool("trainer.ema_warmup", warmup)
    if decay is None:
        if warmup:
            raise UserError("trainer.ema_warmup=true needs an average to warm up: set trainer.ema_decay (e.g. 0.999)")
        return None
    if not (isinstance(decay, float) and 0 < decay < 1):
        raise UserError(f"trainer.ema_decay={decay!r}: must be null (off) or a number strictly between 0 and 1, "
                        "e.g. 0.999")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # One dtype per call (AveragedModel groups them). num_averaged, the updates so far, is a tensor on the
        # weights' device: the warm-up decay is computed there, so an update costs no host sync.
        if not averaged[0].is_floating_point():  # batch norm's num_batches_tracked: the current count
            torch._foreach_copy_(averaged, current)
            return
        d = (torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay).to(averaged[0].dtype) if warmup
             else decay)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
