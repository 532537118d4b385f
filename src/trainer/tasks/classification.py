"""Single-label classification: one class index per image, logits over the classes (the default task)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from trainer.loop.metrics import EpochMetrics
from trainer.loop.step import check_loss
from trainer.tasks.base import Task, loss_tasks


class Classification(Task):
    """One class per image: `num_classes` logits, cross-entropy by default; accuracy, F1, AUROC and the rest
    (trainer.loop.metrics), a confusion matrix and the misclassified images."""

    name = "classification"
    losses = ("cross_entropy", "nll", "mse", "bce", "multi_margin")
    higher_is_better = ("acc", "f1", "balanced_acc", "auroc", "precision", "recall")
    lower_is_better = ("loss", "ece")

    def check_loss(self, loss_fn: nn.Module, data: Any, device: torch.device) -> None:
        fits = loss_tasks(loss_fn)
        if fits is not None and self.name not in fits:
            super().check_loss(loss_fn, data, device)  # the refusal naming the task it fits
        check_loss(loss_fn, data.num_classes, device)

    def metrics(self, split: str, *, data: Any, device: torch.device, top_k: int | None, full: bool,
                extra: dict[str, Any] | None = None) -> EpochMetrics:
        if split == "train":
            return EpochMetrics(data.num_classes, device, top_k=top_k)
        return EpochMetrics(data.num_classes, device, confusion_matrix=True, top_k=top_k, full=full,
                            classes=data.classes, extra=extra)

    def predictions(self, outputs: torch.Tensor, names: Sequence[str], top: int) -> list[list[tuple[int, str, float]]]:
        probs = outputs.float().softmax(dim=1)  # (B, classes)
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)  # (B, top) each
        return [[(i, names[i], v) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]
