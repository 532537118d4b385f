"""What a run leaves for people to read beside its checkpoints: pictures after each evaluation, and after the test
the per-class accuracy, the confusion counts, the model graph, the HParams entry and metrics.json."""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.data import BatchLoader, ImageDataset
from trainer.distributed import Dist
from trainer.errors import require_bool, require_int
from trainer.report.figures import confusion_matrix_image, labelled_grid, reliability_diagram, scatter
from trainer.report.logger import hparams_of
from trainer.report.summary import summarize
from trainer.report.tracker import Tracker
from trainer.run.files import atomic_write
from trainer.system import allocator_in_use, seconds_since_process_start

if TYPE_CHECKING:  # the loop's objects this draws; the loop imports this module, not the reverse
    from trainer.loop.metrics import EpochMetrics
    from trainer.loop.state import Progress

log = logging.getLogger(__name__)

MAX_SCATTERS = 8  # a regression's columns drawn as scatter pictures, each evaluation


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@dataclass(frozen=True)
class ReportOptions:
    """What a run shows beyond its metrics (the `trainer` settings that only the report reads).

    misclassified_images: each validation, a TensorBoard grid of the first N misclassified images (0: off).
    histogram_every_n_epochs: weight and gradient histograms every N epochs (None: off). log_graph: the model
    graph in TensorBoard's Graphs tab, once at the end.
    """

    misclassified_images: int
    histogram_every_n_epochs: int | None
    log_graph: bool

    def validate(self) -> None:
        require_int("trainer.misclassified_images", self.misclassified_images, 0)
        if self.histogram_every_n_epochs is not None:
            require_int("trainer.histogram_every_n_epochs", self.histogram_every_n_epochs, 1)
        require_bool("trainer.log_graph", self.log_graph)


class RunReport:
    """Writes the run's pictures and results through `logger` (rank 0's; other ranks hold a NullLogger) and
    `metrics.json` into `run_dir`. `channels_last` and `limit_eval_batches` are the loop's, for the graph's
    example input and for finding the misclassified images' positions."""

    def __init__(self, *, logger: Tracker, data: ImageDataset, run_dir: Path, config_yaml: str,
                 device: torch.device, dist: Dist, options: ReportOptions, channels_last: bool,
                 limit_eval_batches: int | None) -> None:
        self.logger, self.data, self.run_dir, self.config_yaml = logger, data, run_dir, config_yaml
        self.device, self.dist, self.channels_last = device, dist, channels_last
        self.limit_eval_batches = limit_eval_batches
        self.misclassified_images, self.log_graph = options.misclassified_images, options.log_graph

    def start(self, model: nn.Module, resumed: bool) -> None:
        """The model summary in the log; for a new run also in TensorBoard, with the config and the first training
        images as the model gets them before normalising."""
        images, _ = self.data.test.raw(slice(1))
        # torch.utils.flop_counter costs about 0.1 s here, where torchmetrics has already imported what it needs
        self.summary = summarize(model, self.data.test.transform(images))  # (1, C, H, W) as the model gets it
        log.info("model:\n%s", self.summary.text())
        if resumed:
            return
        self.logger.log_params(hparams_of(self.config_yaml))
        self.logger.log_text("model", self.summary.text())
        self.logger.log_text("config", self.config_yaml)
        self.logger.log_images("inputs/train", self.data.train.raw(slice(64))[0])

    def evaluation(self, metrics: EpochMetrics, loader: BatchLoader, prefix: str, step: int) -> None:
        """The confusion matrix of the evaluation `metrics` just computed and, for validation, a captioned grid
        of its first misclassified images."""
        if not self.dist.is_main:  # the pictures go to TensorBoard, which only rank 0 writes
            return
        if not hasattr(metrics, "last_confusion"):  # another task's metrics than classification's EpochMetrics
            self._task_pictures(metrics, loader, prefix, step)
            return
        confusion = confusion_matrix_image(metrics.last_confusion, self.data.classes)
        self.logger.log_image(f"{prefix}/confusion_matrix", confusion, step)
        if metrics.last_calibration is not None:  # measured in full: ECE's bins
            self.logger.log_image(f"{prefix}/reliability", reliability_diagram(*metrics.last_calibration), step)
        if prefix != "val" or not self.misclassified_images:
            return
        predicted = metrics.last_predictions  # (N,) this rank's samples, in the loader's stored order
        wrong = (predicted != metrics.last_targets).nonzero().squeeze(1)[:self.misclassified_images]
        if not wrong.numel():
            return
        positions = loader.positions(self.limit_eval_batches).to(wrong.device)  # (N,) where they are stored
        images, labels = loader.raw(positions[wrong])  # (n, C, H, W) uint8, (n,)
        names = self.data.classes
        captions = [(f"pred {names[p]}", f"true {names[t]}")
                    for p, t in zip(predicted[wrong].tolist(), labels.tolist())]
        self.logger.log_image(f"{prefix}/misclassified", labelled_grid(images, captions), step)

    def _task_pictures(self, metrics: Any, loader: BatchLoader, prefix: str, step: int) -> None:
        """A regression's predicted-against-true scatter per column; an embedding's projector (validation)."""
        points = getattr(metrics, "last_points", None)
        if points is not None:
            true, predicted = points  # (n, D) each
            for j, name in enumerate(self.data.classes[:MAX_SCATTERS]):
                tag = f"{prefix}/scatter" + (f"/{name.replace('/', '-')}" if len(self.data.classes) > 1 else "")
                self.logger.log_image(tag, scatter(true[:, j], predicted[:, j], name), step)
        projected = getattr(metrics, "last_projected", None)
        if projected is not None and prefix == "val":
            embeddings, classes = projected
            images, _ = loader.raw(loader.positions(self.limit_eval_batches)[:len(embeddings)])
            self.logger.log_embedding("val/embedding", embeddings, [self.data.classes[int(c)] for c in classes],
                                      images, step)

    def test_results(self, model: nn.Module, metrics: dict[str, float], confusion: torch.Tensor, monitor: str,
                     progress: Progress, timing: dict[str, float | None]) -> None:
        """Everything the test leaves: per-class accuracy and confusion counts (`confusion`: (classes, classes),
        rows true), the graph, the HParams entry with the final metrics, and metrics.json (rank 0). `timing`: seconds,
        `startup_s` (process start to first step) and `fit_s` (the training epochs with their validation and
        checkpoints), None where this process did not train."""
        step = progress.global_step
        per_class = dict(zip(self.data.classes, per_class_accuracy(confusion))) if confusion is not None else {}
        best = {f"best/{monitor}": progress.best_metric} if progress.best_metric is not None else {}
        # `params` beside the metrics, so a sweep's HParams table sorts by model size
        final = {**metrics, **best, "params": self.summary.params}
        self.logger.log_metrics({**final, **{f"test/acc_class/{name.replace('/', '-')}": acc
                                             for name, acc in per_class.items() if acc is not None}}, step)
        if confusion is not None:  # classification's
            self.logger.log_confusion_matrix("test/confusion_matrix_counts", confusion, self.data.classes, step)
        if self.log_graph:
            images, _ = self.data.test.raw(slice(2))
            example = self.data.test.transform(images)  # (2, C, H, W) float, as the model gets it
            self.logger.log_graph(model, example.contiguous(memory_format=torch.channels_last)
                                  if self.channels_last else example)
        # the HParams table: every final metric but the per-class ones (test/f1/<class>, ...: too many columns)
        self.logger.log_hparams(hparams_of(self.config_yaml), {k: v for k, v in final.items()
                                                               if not is_per_class(k)},
                                step)
        summary = {**metrics, f"best/{monitor}": progress.best_metric, "best/epoch": progress.best_epoch,
                   "epochs": progress.epoch, "global_step": step, "params": self.summary.params,
                   "params_trainable": self.summary.trainable, "macs_per_image": self.summary.macs_per_image,
                   "peak_rss_mib": peak_rss_mib(),
                   "allocator": allocator_in_use(),
                   **{key: None if value is None else round(value, 3) for key, value in timing.items()},
                   "seconds_since_start": round(seconds_since_process_start(), 3),
                   **({"per_class_acc": per_class} if confusion is not None else {})}  # classification's
        if self.device.type == "cuda":
            summary["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.dist.is_main:
            summary["world_size"] = self.dist.world_size
            with atomic_write(self.run_dir / "metrics.json") as f:
                f.write(json.dumps(summary, indent=2).encode())
            self.logger.log_artifact(self.run_dir / "metrics.json")
        log.info("test  %s  [%.1fs since start, peak RSS %.0f MiB]", "  ".join(f"{k} {v:.4f}" for k, v in
                 metrics.items() if not is_per_class(k)), summary["seconds_since_start"], summary["peak_rss_mib"])


def is_per_class(key: str) -> bool:
    """Whether a metric key is one class's (`test/f1/<class>`, `val/auroc/<class>`): left out of the console's
    lines, the HParams table and the lists an error names. `best/<monitor>` is the run's, whatever its monitor."""
    return key.count("/") > 1 and not key.startswith("best/")


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class from a (classes, classes) confusion matrix with true classes as rows; None for a class
    with no sample in the split (a small folder's test split may hold none of a class: not 0% right)."""
    counts = confusion.sum(dim=1)  # (classes,) samples of each true class
    recall = (confusion.diag() / counts.clamp(min=1)).tolist()
    return [None if n == 0 else r for n, r in zip(counts.tolist(), recall)]
