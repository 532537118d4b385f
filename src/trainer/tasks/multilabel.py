"""Multi-label classification: any number of labels per image, (N, K) multi-hot targets, one logit per label."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from trainer.errors import UserError, is_number
from trainer.loop.metrics import (
    MAX_AUROC_BINS,
    MAX_AUROC_CELLS,
    histogram_auroc,
    histogram_average_precision,
    metric_key,
    score_bins,
)
from trainer.tasks.base import SumMetrics, Task


class MultiLabel(Task):
    """Labels that may appear together (a photo's objects, a mosaic's digits): K logits, each a sigmoid "is label k
    present?"; binary cross-entropy (loss=bce). A label is predicted where its probability reaches `threshold`."""

    name = "multilabel"
    targets = "multi_hot"
    losses = ("bce",)
    export_output = "float32 logits (batch, labels); the sigmoid of each is its label's probability"
    higher_is_better = ("f1_micro", "f1_macro", "subset_acc", "map", "auroc", "ap", "f1")

    def __init__(self, threshold: float = 0.5) -> None:
        if not (is_number(threshold) and 0 < threshold < 1):
            raise UserError(f"task.threshold={threshold!r}: must be a probability strictly between 0 and 1")
        self.threshold = float(threshold)

    def metrics(self, split: str, *, data: Any, device: torch.device, top_k: int | None, full: bool,
                extra: dict[str, Any] | None = None) -> MultiLabelMetrics:
        return MultiLabelMetrics(data.classes, device, self.threshold, ranking=split != "train",
                                 extra=None if split == "train" else extra)

    def predictions(self, outputs: torch.Tensor, names: Sequence[str], top: int) -> list[list[tuple[int, str, float]]]:
        probs = outputs.float().sigmoid()  # (B, K)
        rows = []
        for row in probs.tolist():
            over = sorted(((p, i) for i, p in enumerate(row) if p >= self.threshold), reverse=True)
            rows.append([(i, names[i], p) for p, i in over])  # every label over the threshold, however many
        return rows

    def state_dict(self) -> dict:
        return {"name": self.name, "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict, where: str) -> MultiLabel:
        threshold = state.get("threshold")
        if not (isinstance(threshold, float) and 0 < threshold < 1):
            raise UserError(f"{where}: its multi-label threshold {threshold!r} is not a probability in (0, 1)")
        return cls(threshold)


class MultiLabelMetrics(SumMetrics):
    """Micro and macro F1 and the exact-match ratio (`subset_acc`) at the threshold; with `ranking` (validation
    and the test) also mean average precision (`map`) and macro AUROC, and AP, AUROC and F1 per label. The ranking
    metrics are read off per-label histograms of the logits (log-odds), as EpochMetrics reads AUROC: bounded
    memory whatever the number of samples, exact up to ties within a bin 1/128 wide. Means over labels leave out
    a label that the split never holds (its AP and AUROC are undefined)."""

    def __init__(self, labels: Sequence[str], device: torch.device, threshold: float, ranking: bool,
                 extra: dict[str, Any] | None = None) -> None:
        self.labels = [metric_key(c) for c in labels]
        self.cut = math.log(threshold / (1 - threshold))  # the logit of the threshold
        self.ranking = ranking
        self.bins = max(16, min(MAX_AUROC_BINS, MAX_AUROC_CELLS // max(len(self.labels), 1)))
        super().__init__(device, extra)

    def names(self, prefix: str) -> tuple[str, ...]:
        names = ["loss", "f1_micro", "f1_macro", "subset_acc"]
        if self.ranking:
            names += ["map", "auroc", *(f"{m}/{c}" for m in ("ap", "auroc", "f1") for c in self.labels)]
        return tuple(f"{prefix}/{n}" for n in [*names, *self.extra])

    def _extra_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs, targets.long()  # torchmetrics' multilabel metrics: logits, and integer 0/1 targets

    def _zero_counts(self) -> dict[str, torch.Tensor]:
        k, device = len(self.labels), self.device
        counts = {key: torch.zeros(k, dtype=torch.int64, device=device) for key in ("tp", "fp", "fn")}
        counts["exact"] = torch.zeros(2, dtype=torch.int64, device=device)  # images all right, images
        if self.ranking:
            counts["scores"] = torch.zeros(2 * k * self.bins, dtype=torch.int64, device=device)
        return counts

    def _accumulate(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        c, k = self.counts, len(self.labels)
        truth = targets > 0.5  # (n, K)
        predicted = outputs >= self.cut
        c["tp"] += (predicted & truth).sum(0)
        c["fp"] += (predicted & ~truth).sum(0)
        c["fn"] += (~predicted & truth).sum(0)
        c["exact"] += torch.stack([(predicted == truth).all(1).sum(), torch.tensor(len(truth), device=self.device)])
        if self.ranking:
            index = (torch.arange(k, device=outputs.device) * self.bins + score_bins(outputs, self.bins)
                     + truth.long() * (k * self.bins))  # (n, K): negatives' histograms, then positives'
            c["scores"] += torch.bincount(index.flatten(), minlength=2 * k * self.bins)

    def _values(self, counts: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)  # (K,)
        present = (tp + fp + fn) > 0  # as torchmetrics' macro mean: a label neither present nor predicted is left out
        micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
        right, images = counts["exact"].tolist()
        found = {f"{prefix}/f1_micro": float(micro),
                 f"{prefix}/f1_macro": float((f1 * present).sum() / present.sum().clamp(min=1)),
                 f"{prefix}/subset_acc": right / images if images else math.nan}
        if self.ranking:
            scores = counts["scores"].view(2, len(self.labels), self.bins)
            ap, auroc = histogram_average_precision(scores), histogram_auroc(scores)  # (K,) each
            found[f"{prefix}/map"] = float(ap.nanmean()) if (~ap.isnan()).any() else math.nan
            found[f"{prefix}/auroc"] = float(auroc.nanmean()) if (~auroc.isnan()).any() else math.nan
            for name, values in (("ap", ap), ("auroc", auroc), ("f1", f1)):
                found.update({f"{prefix}/{name}/{c}": float(v) for c, v in zip(self.labels, values)})
        return found
