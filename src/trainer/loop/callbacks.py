"""Callbacks: a user's code at named events of the loop, without editing the Trainer.

A callback subclasses `Callback` and overrides the events it needs; each gets the Trainer (its `model`,
`optimizer`, `progress`, `run_dir`, `dist`, `logger`, ...). `callbacks=[name,...]` picks configs/callbacks/*.yaml
(a user's folder too, through --config-dir), each built by `_target_` from the config, never from a checkpoint.

Every event runs on every rank under torchrun, in the order of the config; `trainer.dist.is_main` tells rank 0,
the one that writes files and logs. A callback that keeps state across a resume returns it from `state_dict()`
(tensors and plain values): each checkpoint stores it, and a resumed run hands it back to `load_state_dict()`
before its first event, so a run with callbacks resumes as exactly as one without. docs/callbacks.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.loop.trainer import Trainer

EVENTS = ("on_fit_start", "on_step_end", "on_validation_end", "on_checkpoint", "on_fit_end", "on_test_end")


class Callback:
    """Base class of a callback: every event does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first training step of `fit()` (after a resume has restored everything)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (`trainer.progress.global_step` counts it). Reading a tensor's value here is
        a host sync per step: keep it off the hot path, e.g. every N steps."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each epoch's validation, with that epoch's train and validation metrics (`val/acc`, ...), before
        the epoch's checkpoint is written."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After `path` (last.pt or best.pt) was written (by rank 0; every rank gets the event)."""

    def on_fit_end(self, trainer: Trainer, best: dict[str, float]) -> None:
        """After the last epoch, with `best/<monitor>` and `best/epoch`."""

    def on_test_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the test of the best checkpoint, with its metrics (`test/acc`, ...)."""

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a resume (tensors and plain values); {} if nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (on resume, before any event)."""


class Callbacks:
    """The run's callbacks by name; `callbacks.on_step_end(trainer)` calls each that overrides the event, in order."""

    def __init__(self, callbacks: dict[str, Callback] | Iterable[Callback] = ()) -> None:
        if not isinstance(callbacks, dict):
            callbacks = {f"{i}_{type(c).__name__}": c for i, c in enumerate(callbacks)}
        for name, callback in callbacks.items():
            if not isinstance(callback, Callback):
                raise UserError(f"callbacks.{name}: its class {type(callback).__name__} is not a subclass of "
                                "trainer.loop.callbacks.Callback (docs/callbacks.md)")
        self.by_name = dict(callbacks)
        for event in EVENTS:  # only the overriding ones: an event no callback takes costs nothing in the loop
            hooks = [getattr(c, event) for c in self.by_name.values()
                     if getattr(type(c), event) is not getattr(Callback, event)]
            setattr(self, event, _calling(hooks) if hooks else _nothing)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: state for name, c in self.by_name.items() if (state := c.state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> list[str]:
        """Hand each callback its saved state; returns the names in `state` that no callback of this run has."""
        for name, callback in self.by_name.items():
            if name in state:
                callback.load_state_dict(state[name])
        return [name for name in state if name not in self.by_name]


def _calling(hooks: list):
    def call(*args: Any) -> None:
        for hook in hooks:
            hook(*args)
    return call


def _nothing(*args: Any) -> None:
    pass
