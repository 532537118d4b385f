"""Epoch metrics (mean loss, accuracy, macro F1, confusion matrix), accumulated on the device, and `evaluate`."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score


class EpochMetrics:
    """Mean loss, accuracy and macro F1 over an epoch, accumulated on the device.

    `add` only buffers a batch's results on the device; they reach torchmetrics in one update per
    `flush` (per-batch metric updates cost more than a small model's whole step). `compute()` is the
    only host sync. `state_dict()` holds the buffer too, so a run resumed mid-epoch ends the epoch with
    exactly the numbers of a run that never stopped.
    """

    def __init__(self, num_classes: int, device: torch.device, confusion_matrix: bool = False) -> None:
        self.device = device
        # With confusion_matrix, compute() also sets last_confusion (rows: true class, columns: predicted) and
        # last_predictions/last_targets, (N,) each, in the order the samples were added.
        self.confusion = MulticlassConfusionMatrix(num_classes, validate_args=False).to(device) if confusion_matrix else None
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: torch.Tensor | None = None
        self.last_targets: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # flushed (preds, targets), with confusion_matrix
        # nan_strategy/validate_args off: their checks read values back to the host on every update.
        self.metrics = {"loss": MeanMetric(nan_strategy="disable"),
                        "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                        "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False)}
        for m in self.metrics.values():
            m.persistent(True)  # metric states go into state_dict(), hence into checkpoints
            m.to(device)
        self._losses: list[torch.Tensor] = []  # per-batch mean losses, scalars
        self._preds: list[torch.Tensor] = []  # (B_i,) predicted classes
        self._targets: list[torch.Tensor] = []  # (B_i,)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        self._preds.append(logits.detach().argmax(dim=1))
        self._targets.append(targets)

    @property
    def has_pending(self) -> bool:
        return bool(self._losses)

    def pending_losses(self) -> torch.Tensor:
        """The per-batch mean losses added since the last flush, (k,), consecutive batches in order."""
        return torch.stack(self._losses) if self._losses else torch.empty(0, device=self.device)

    def flush(self) -> None:
        if not self._losses:
            return
        sizes = [t.numel() for t in self._targets]
        # Mean over samples, not batches. torchmetrics 1.9 drops `weight` under nan_strategy="disable", so each
        # batch's mean loss is repeated once per sample; output_size keeps that free of a CUDA host sync.
        per_sample = torch.stack(self._losses).float().repeat_interleave(
            torch.tensor(sizes, device=self.device), output_size=sum(sizes))  # (sum B_i,)
        self.metrics["loss"].update(per_sample)
        preds, targets = torch.cat(self._preds), torch.cat(self._targets)
        self.metrics["acc"].update(preds, targets)
        self.metrics["f1"].update(preds, targets)
        if self.confusion is not None:
            self.confusion.update(preds, targets)
            self._seen.append((preds, targets))
        self._losses, self._preds, self._targets = [], [], []

    def compute(self, prefix: str) -> dict[str, float]:
        self.flush()
        out = {f"{prefix}/{name}": float(m.compute()) for name, m in self.metrics.items()}
        for m in self.metrics.values():
            m.reset()
        if self.confusion is not None:
            self.last_confusion = self.confusion.compute()  # (classes, classes) counts
            self.confusion.reset()
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            preds, targets = zip(*self._seen) if self._seen else ([empty], [empty])
            self.last_predictions, self.last_targets = torch.cat(preds), torch.cat(targets)
            self._seen = []
        return out

    def state_dict(self) -> dict:
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        return {"metrics": {name: dict(m.state_dict()) for name, m in self.metrics.items()},
                "losses": self.pending_losses(), "sizes": [t.numel() for t in self._targets],
                "preds": torch.cat(self._preds) if self._preds else empty,
                "targets": torch.cat(self._targets) if self._targets else empty}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.metrics.items():
            m.load_state_dict(state["metrics"][name])
            m.to(self.device)
        self._losses = list(state["losses"].to(self.device).unbind())
        self._preds = list(state["preds"].to(self.device).split(state["sizes"]))
        self._targets = list(state["targets"].to(self.device).split(state["sizes"]))


def to_cpu(obj: object) -> object:
    """`obj` with every tensor in it (through dicts and lists) moved to the CPU, to pickle between ranks."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a (classes, classes) confusion matrix with true classes as rows."""
    return (confusion.diag() / confusion.sum(dim=1).clamp(min=1)).tolist()


Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (images, targets) -> logits, loss


@torch.inference_mode()
def evaluate(forward: Forward, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], metrics: EpochMetrics,
             prefix: str, limit_batches: int | None = None) -> dict[str, float]:
    """Loss, accuracy and macro F1 over `loader` (its first `limit_batches`), keyed `<prefix>/loss` etc.
    The model must already be in eval mode."""
    for images, targets in itertools.islice(loader, limit_batches):
        logits, loss = forward(images, targets)
        metrics.add(loss, logits, targets)
    return metrics.compute(prefix)
