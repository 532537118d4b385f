"""The LR range test (Leslie Smith, "Cyclical Learning Rates for Training Neural Networks", 2017): train a copy of
the model for a few hundred steps while the learning rate grows exponentially, and read a good LR off the loss.

The suggestion rule: the LR at which the smoothed loss is lowest, divided by 2 for a schedule that warms up to its
peak and anneals from it (scheduler=onecycle, the default: `optimizer.lr` is its peak), by 5 for one that trains at
`optimizer.lr` from the first step (none, step, cosine, ...). The minimum is stable where the steepest-slope point
(Lightning's) and fastai's valley move with a few batches' noise, and fell far too low here.
Checked: under one-cycle, on MNIST, FashionMNIST, an image folder and a 3-channel set with an MLP and SGD, a CNN
and Adam, and a CNN and SGD (12 cases, one epoch each), half the minimum landed within 1.2 points of the best LR
found, and within 0.5 in 10 cases; a fifth fell up to 11.9 points short, too low in every SGD case. At a constant
LR on MNIST (3 cases), a fifth landed within 0.1 point. docs/configs.md "LR range test" has both tables.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from trainer.errors import UserError, is_number, require_int


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)  # the LR of each step
    losses: list[float] = field(default_factory=list)  # its training loss
    smoothed: list[float] = field(default_factory=list)  # exponential moving average, bias-corrected
    diverged: bool = False  # stopped because the smoothed loss passed `diverge` x its minimum
    divisor: float = 5.0  # the suggestion is the lowest point's LR over this: see `divisor_for`

    @property
    def lowest_lr(self) -> float:
        """The LR at the smoothed loss's minimum."""
        return self.lrs[min(range(len(self.smoothed)), key=self.smoothed.__getitem__)]

    @property
    def suggestion(self) -> float:
        """The LR at the smoothed loss's minimum, over `divisor`."""
        return self.lowest_lr / self.divisor


WARMS_UP = ("trainer.loop.schedulers.onecycle",)  # schedules whose optimizer.lr is a peak reached after a warm-up


def divisor_for(scheduler_target: str) -> float:
    """What the LR at the smoothed loss's minimum is divided by for a schedule (its `_target_`): 2 where
    `optimizer.lr` is the peak of a warm-up and anneal (one-cycle), 5 where training runs at it from the start."""
    return 2.0 if scheduler_target in WARMS_UP else 5.0


def check_range_settings(*, start_lr: float, end_lr: float, num_steps: int, smoothing: float, diverge: float) -> None:
    """Raise UserError naming the first bad `lr_find.` setting and what is allowed."""
    def number(value: object) -> bool:
        return is_number(value) and math.isfinite(value)

    require_int("lr_find.num_steps", num_steps, 10)
    if not (number(start_lr) and number(end_lr) and 0 < start_lr < end_lr):
        raise UserError(f"lr_find.start_lr={start_lr!r}, lr_find.end_lr={end_lr!r}: need 0 < start_lr < end_lr")
    if not (number(smoothing) and 0 <= smoothing < 1):
        raise UserError(f"lr_find.smoothing={smoothing!r}: must be a number in [0, 1)")
    if not (number(diverge) and diverge > 1):
        raise UserError(f"lr_find.diverge={diverge!r}: must be a number > 1")


def lr_range_test(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                  batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], *, start_lr: float,
                  end_lr: float, num_steps: int, smoothing: float, diverge: float) -> RangeTest:
    """Sweep the LR from `start_lr` to `end_lr` over `num_steps` optimizer steps, exponentially, on a copy of
    `model` and a new optimizer of `optimizer`'s class and settings (the model and optimizer given are not
    changed). `batches()` starts a new pass over the training data; the sweep takes as many as it needs."""
    check_range_settings(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, smoothing=smoothing, diverge=diverge)
    net = copy.deepcopy(model).train()
    # Only the settings its constructor takes: AdamW's defaults hold decoupled_weight_decay (torch 2.14), which
    # AdamW() refuses since it is always on there.
    takes = inspect.signature(type(optimizer).__init__).parameters
    opt = type(optimizer)(net.parameters(), **{k: v for k, v in optimizer.defaults.items() if k in takes or any(
        p.kind == p.VAR_KEYWORD for p in takes.values())})
    out, average, data = RangeTest(), 0.0, batches()
    for step in range(num_steps):
        lr = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            images, targets = next(data)
        except StopIteration:
            data = batches()
            images, targets = next(data)
        loss = loss_fn(net(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())  # a host sync per step: this is a diagnostic, not the training loop
        if not math.isfinite(value):
            out.diverged = True
            break
        average = smoothing * average + (1 - smoothing) * value
        out.lrs.append(lr)
        out.losses.append(value)
        out.smoothed.append(average / (1 - smoothing ** (step + 1)))
        if out.smoothed[-1] > diverge * min(out.smoothed):
            out.diverged = True
            break
    return out
