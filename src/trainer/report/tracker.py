"""The experiment-tracker interface: what a run tells TensorBoard, a CSV file, MLflow or a user's own tracker.

A tracker is a class with `Tracker`'s methods, built by the Trainer as `tracker(log_dir=run_dir, purge_step=...)`
once it knows the run's directory (`purge_step`: on resume, the first step after the checkpoint; what the
interrupted run logged from there on must not show twice). It overrides what it can show and inherits a no-op for
the rest. `logger=[tensorboard,csv]` picks several; `Trackers` hands every call to each, in order. Only rank 0
logs under torchrun (the other ranks get `Trackers([])`).

A tracker whose run lives outside the run directory (MLflow's run id) returns what it needs to continue from
`state_dict()`: the checkpoints store it (plain values only) and a resumed run passes it back to
`load_state_dict()` before anything is logged. docs/tracking.md shows a user's tracker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from trainer.errors import UserError


class Tracker:
    """Base class of a tracker: every method does nothing. Subclasses override what they show."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = Path(log_dir), purge_step

    def log_params(self, params: dict[str, str | int | float | bool]) -> None:
        """A new run's flattened hyperparameters (`optimizer.lr`, `model` = the class name, ...), once at its start."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at optimizer step `step`: `train/loss` every log interval, the epoch's metrics at its end."""

    def log_hparams(self, hparams: dict[str, str | int | float | bool], metrics: dict[str, float], step: int) -> None:
        """At the end of the test: the hyperparameters beside the final metrics (TensorBoard's HParams tab), which
        `log_metrics` has just logged at `step` (all of them; here the per-class ones are left out)."""

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """A text: the model summary and the config (YAML) at the start of a new run."""

    def log_images(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        """A grid of uint8 images (N, C, H, W)."""

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One picture, (3, H, W) uint8: confusion matrices, reliability diagrams, misclassified images."""

    def log_histograms(self, model: torch.nn.Module, step: int, grad_scale: float = 1.0) -> None:
        """Weights and gradients (divided by `grad_scale`) of `model`, every `trainer.histogram_every_n_epochs`."""

    def log_embedding(self, tag: str, embeddings: torch.Tensor, labels: Sequence[str], images: torch.Tensor,
                      step: int) -> None:
        """Embeddings (N, D) with a label and a uint8 thumbnail (N, C, H, W) each: TensorBoard's projector."""

    def log_graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model's graph, once at the end, on an example input."""

    def log_confusion_matrix(self, tag: str, confusion: torch.Tensor, classes: Sequence[str], step: int) -> None:
        """A (classes, classes) count matrix, rows true, columns predicted."""

    def log_artifact(self, path: Path) -> None:
        """A file the run has finished writing: metrics.json, the model summary, best.pt (rank 0, at the end)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker's run (plain values only); {} for most trackers."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run that `state_dict()` described (called on resume, before anything is logged)."""

    def flush(self) -> None:
        """Make everything logged so far durable: called after each checkpoint, which says everything up to its
        step is done."""

    def close(self) -> None:
        """The run is over (or refused): release files and connections."""


class Trackers(Tracker):
    """Several trackers as one: each call goes to every tracker, in the order of the config."""

    def __init__(self, trackers: Iterable[Tracker], names: Iterable[str] | None = None) -> None:
        self.trackers = list(trackers)
        self.names = list(names) if names is not None else [type(t).__name__ for t in self.trackers]

    @classmethod
    def build(cls, factories: dict[str, Callable[..., Tracker]], log_dir: Path, purge_step: int | None) -> Trackers:
        """Build each `name: factory` (the `logger` config's) for `log_dir`; on a failure, close those built."""
        built: dict[str, Tracker] = {}
        try:
            for name, factory in factories.items():
                built[name] = factory(log_dir=log_dir, purge_step=purge_step)
                if not isinstance(built[name], Tracker):
                    raise UserError(f"logger.{name}: its class {type(built.pop(name)).__name__} is not a subclass of "
                                    "trainer.report.tracker.Tracker (docs/tracking.md)")
        except BaseException:
            cls(built.values()).close()
            raise
        return cls(built.values(), built)

    def _each(name: str):  # noqa: N805 (builds the fan-out methods below)
        def fan_out(self, *args, **kwargs) -> None:
            for tracker in self.trackers:
                getattr(tracker, name)(*args, **kwargs)
        fan_out.__name__ = name
        fan_out.__doc__ = getattr(Tracker, name).__doc__
        return fan_out

    log_params = _each("log_params")
    log_metrics = _each("log_metrics")
    log_hparams = _each("log_hparams")
    log_text = _each("log_text")
    log_images = _each("log_images")
    log_image = _each("log_image")
    log_histograms = _each("log_histograms")
    log_graph = _each("log_graph")
    log_embedding = _each("log_embedding")
    log_confusion_matrix = _each("log_confusion_matrix")
    log_artifact = _each("log_artifact")
    flush = _each("flush")

    def close(self) -> None:
        """Close every tracker, even when one fails (the first failure is raised after)."""
        error = None
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001 (raised below, once every tracker has had its close)
                error = error or e
        if error is not None:
            raise error

    def state_dict(self) -> dict[str, Any]:
        """Each tracker's state that is not empty, by its name in the config."""
        return {name: state for name, tracker in zip(self.names, self.trackers) if (state := tracker.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tracker in zip(self.names, self.trackers):
            if name in state:
                tracker.load_state_dict(state[name])

    del _each


class NullLogger(Tracker):
    """Logs nothing: for a run that keeps no record but its checkpoints and metrics.json (and for ranks other than
    0 under torchrun, so one run has one record)."""
