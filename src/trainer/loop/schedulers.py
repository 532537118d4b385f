"""Learning-rate schedules: one function per `configs/scheduler/*.yaml`.

Every function takes the optimizer and the run's length (`steps_per_epoch`, `max_epochs`, known only
at runtime) plus its own settings, and returns a `Schedule`: the torch scheduler together with the
cadence the Trainer must step it at. Schedules that shape the whole run (cosine, onecycle, warmup)
step per batch so the curve is smooth; the classic epoch-wise ones step per epoch; plateau steps per
epoch on the monitored validation metric.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from trainer.errors import UserError

log = logging.getLogger(__name__)


class Schedule:
    """A torch LR scheduler (or none) and when to step it: after every batch or after every epoch.

    `run_length_keys` name the scheduler's state that follows from the run's length (a one-cycle's
    `total_steps`), and `lr_at` gives the LRs of the schedule at its current step. When a run resumes with
    another length (trainer.max_epochs raised, say), those keys keep this run's values and the LRs are set
    from `lr_at`: from the resumed step on, the run follows the curve of a run planned with the new length.

    torch's public state (state_dict, load_state_dict, get_last_lr) has no way to re-plan a schedule's length, so
    three private names are used, each where nothing public does the same:
    - `lrs._enable_get_lr_call`: get_lr() outside step() warns that its value is wrong, which for the closed-form
      schedules used here it is not; this context is how torch's own step() silences that warning;
    - `scheduler._last_lr`: what get_last_lr() returns (and what the logged LR is read from) after the LRs are set
      here; step() sets it, and no public setter exists;
    - CosineAnnealingLR's `_get_closed_form_lr`: its public get_lr() is recursive (the last LR times a factor),
      so it cannot give the LR of a step on a curve of another length; the closed form can. OneCycleLR's public
      get_lr() is already closed-form, and its `_schedule_phases` is state it saves and derives from the length.
    """

    def __init__(self, scheduler: Any | None, interval: Literal["step", "epoch"], needs_metric: bool = False,
                 run_length_keys: tuple[str, ...] = (), lr_at: Callable[[], list[float]] | None = None) -> None:
        self.scheduler, self.interval, self.needs_metric = scheduler, interval, needs_metric
        self.run_length_keys, self.lr_at = run_length_keys, lr_at

    def after_batch(self) -> None:
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, metric: float) -> None:
        if self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step(metric) if self.needs_metric else self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is None:
            return
        planned = {k: v for k, v in self.scheduler.state_dict().items() if k in self.run_length_keys}
        self.scheduler.load_state_dict({**state, **planned})
        if any(state.get(k) != v for k, v in planned.items()):
            try:
                with lrs._enable_get_lr_call(self.scheduler):  # torch warns about get_lr() outside step() otherwise
                    new = self.lr_at()
            except ValueError:  # now shorter than the steps already taken: the run only does its test
                return
            for group, lr in zip(self.scheduler.optimizer.param_groups, new):
                group["lr"] = lr
            self.scheduler._last_lr = [group["lr"] for group in self.scheduler.optimizer.param_groups]


def bind(scheduler: Callable[..., Schedule], optimizer: Optimizer, steps_per_epoch: int, max_epochs: int) -> Schedule:
    """The schedule of a run of this length: `scheduler` is one of the functions below (a config's partial)."""
    try:
        return scheduler(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
    except (ValueError, TypeError) as e:
        raise UserError(f"scheduler={getattr(scheduler, 'func', scheduler).__name__}: {e}") from None


def none(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int) -> Schedule:
    """Constant learning rate."""
    return Schedule(None, "epoch")


def step(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, step_size: int, gamma: float) -> Schedule:
    """Multiply the LR by `gamma` every `step_size` epochs."""
    return Schedule(lrs.StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch")


def multistep(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, milestones: list[int],
              gamma: float) -> Schedule:
    """Multiply the LR by `gamma` at each epoch in `milestones`."""
    return Schedule(lrs.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma), "epoch")


def exponential(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, gamma: float) -> Schedule:
    """Multiply the LR by `gamma` every epoch."""
    return Schedule(lrs.ExponentialLR(optimizer, gamma=gamma), "epoch")


def cosine(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, eta_min: float) -> Schedule:
    """Cosine decay from the optimizer's LR to `eta_min` over the whole run, per batch."""
    scheduler = lrs.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * max_epochs, eta_min=eta_min)
    return Schedule(scheduler, "step", run_length_keys=("T_max",), lr_at=scheduler._get_closed_form_lr)


def plateau(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, mode: str, factor: float,
            patience: int, threshold: float, min_lr: float) -> Schedule:
    """Multiply the LR by `factor` when the monitored validation metric stalls for `patience` epochs."""
    return Schedule(lrs.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                          threshold=threshold, min_lr=min_lr), "epoch", needs_metric=True)


def onecycle(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, max_lr: float, pct_start: float,
             div_factor: float, final_div_factor: float, anneal_strategy: str, cycle_momentum: bool) -> Schedule:
    """Leslie Smith's one-cycle policy over the whole run, per batch.

    With `cycle_momentum`, momentum (or Adam's beta1) cycles inversely to the LR, for optimizers that
    have one; Adagrad and Adadelta have none, so only their LR cycles.
    """
    total_steps = steps_per_epoch * max_epochs
    if total_steps <= 2:  # no curve fits: torch's phases need a warm-up step, a peak and an anneal step
        log.info("scheduler=onecycle: a %d-step run is too short for a cycle; it trains at max_lr=%g throughout",
                 total_steps, max_lr)
        for group in optimizer.param_groups:
            group["lr"] = max_lr
        return Schedule(None, "step")
    # torch divides by (pct_start * total_steps - 1): a short run (a small folder's first try) warms up over 2
    # steps, the fewest that make a curve, rather than being refused
    if pct_start * total_steps < 2:
        short = 2 / total_steps
        log.info("scheduler=onecycle: a %d-step run warms up over 2 steps (pct_start %.3g, not %g)", total_steps,
                 short, pct_start)
        pct_start = short
    has_momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    scheduler = lrs.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
                               div_factor=div_factor, final_div_factor=final_div_factor,
                               anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum and has_momentum)
    # get_lr() is closed-form in the step and also sets the cycled momentum
    return Schedule(scheduler, "step", run_length_keys=("total_steps", "_schedule_phases"), lr_at=scheduler.get_lr)


def warmup(optimizer: Optimizer, *, steps_per_epoch: int, max_epochs: int, warmup_steps: int) -> Schedule:
    """Linear warm-up over `warmup_steps` batches, then the optimizer's LR: batch i trains at
    LR * min(1, (i + 1) / warmup_steps) (torch's LinearLR)."""
    if not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps!r}: must be an integer >= 1")
    scheduler = lrs.LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0,
                             total_iters=max(1, warmup_steps - 1))  # (i + 1) / W reaches 1 at batch W - 1
    return Schedule(scheduler, "step")
