"""Epoch metrics (mean loss, accuracy, macro F1, confusion matrix), accumulated on the device, and `evaluate`.

They are counts on the device (per class: true positives, false positives, false negatives; the loss sum), with
the definitions of torchmetrics' MeanMetric, micro MulticlassAccuracy and macro MulticlassF1Score (a class that
is neither predicted nor present does not count towards the macro mean). tests/test_metrics.py checks them
against torchmetrics. Why not torchmetrics itself: importing it costs 2.3 s and 230 MiB in every process (it
imports torchvision, torch._dynamo and scipy.signal), which was most of the time before a run's first step and
a fifth of a CNN run's peak memory (docs/performance.md "Memory and start-up").
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch.distributed as td

from trainer.errors import UserError

MAX_PENDING_LOGITS = 2**22  # 16 MiB of float32 logits held before they are reduced to predictions


class EpochMetrics:
    """Mean loss, accuracy and macro F1 over an epoch, accumulated on the device.

    `add` only buffers a batch's results on the device; they reach the counts in one update per `flush`
    (per-batch metric updates cost more than a small model's whole step). `compute()` is the only host sync
    (and, on CUDA, each flush's bincount); under torchrun it sums the counts of every rank. `state_dict()` holds
    the buffer too, so a run resumed mid-epoch ends the epoch with exactly the numbers of a run that never
    stopped.
    """

    NAMES = ("loss", "acc", "f1")  # compute() returns <prefix>/<name> for each

    def __init__(self, num_classes: int, device: torch.device, confusion_matrix: bool = False) -> None:
        self.num_classes, self.device, self.keeps_confusion = num_classes, device, confusion_matrix
        # With confusion_matrix, compute() also sets last_confusion (rows: true class, columns: predicted) and
        # last_predictions/last_targets, (N,) each, this rank's samples in the order they were added.
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: torch.Tensor | None = None
        self.last_targets: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # flushed (preds, targets), with confusion_matrix
        self._reset_counts()
        self._losses: list[torch.Tensor] = []  # per-batch mean losses, scalars
        self._preds: list[torch.Tensor] = []  # predicted classes, 1-D, of the samples before those in _logits
        self._logits: list[torch.Tensor] = []  # (B_i, classes), not yet reduced to predictions
        self._logit_values = 0  # elements in _logits
        self._targets: list[torch.Tensor] = []  # (B_i,)

    def _reset_counts(self) -> None:
        zeros = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        self.counts = {"tp": zeros, "fp": zeros.clone(), "fn": zeros.clone(),  # (classes,) each
                       "loss_sum": torch.zeros((), device=self.device),  # sum over samples of the batch mean loss
                       "loss_weight": torch.zeros((), device=self.device)}  # samples counted in loss_sum
        self.confusion = (torch.zeros(self.num_classes ** 2, dtype=torch.int64, device=self.device)
                          if self.keeps_confusion else None)  # (classes * classes,): true * classes + predicted

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        # Kept, and reduced to predictions in one argmax for many batches: one kernel a step less on the hot path.
        self._logits.append(logits.detach())
        self._logit_values += logits.numel()
        if self._logit_values > MAX_PENDING_LOGITS:
            self._predict()
        self._targets.append(targets)

    def _predict(self) -> None:
        if self._logits:
            self._preds.append(torch.cat(self._logits).argmax(dim=1))  # (sum B_i,), each row as argmax of its batch
            self._logits, self._logit_values = [], 0

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
        c, k = self.counts, self.num_classes
        losses = torch.stack(self._losses).float()  # (batches,) batch means, weighted below by their sizes
        c["loss_sum"] += (losses * torch.tensor(sizes, dtype=losses.dtype, device=self.device)).sum()
        c["loss_weight"] += sum(sizes)
        self._predict()
        preds, targets = torch.cat(self._preds), torch.cat(self._targets)  # (n,) each
        # One bincount: the flush's confusion matrix, from which the per-class counts follow. Even for 1000
        # classes its 10^6 bins cost about a millisecond, once per log interval, not per step.
        matrix = torch.bincount(targets * k + preds, minlength=k * k).view(k, k)  # rows true, columns predicted
        tp = matrix.diagonal()
        c["tp"] += tp
        c["fn"] += matrix.sum(1) - tp
        c["fp"] += matrix.sum(0) - tp
        if self.confusion is not None:
            self.confusion += matrix.view(-1)
            self._seen.append((preds, targets))
        self._losses, self._preds, self._targets = [], [], []

    def compute(self, prefix: str) -> dict[str, float]:
        self.flush()
        c = self.counts
        if td.is_available() and td.is_initialized():  # every rank's samples, as torchmetrics syncs on compute
            for t in (*c.values(), *([self.confusion] if self.confusion is not None else [])):
                td.all_reduce(t)
        tp, fp, fn = (c[key].float() for key in ("tp", "fp", "fn"))  # float32, as torchmetrics computes (and MPS has)
        f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)  # (classes,)
        present = (tp + fp + fn) > 0
        values = torch.stack([c["loss_sum"] / c["loss_weight"],  # NaN with no sample, as torchmetrics
                              tp.sum() / (tp.sum() + fn.sum()).clamp(min=1),
                              (f1 * present).sum() / present.sum().clamp(min=1)]).tolist()  # the host sync
        if self.confusion is not None:
            self.last_confusion = self.confusion.view(self.num_classes, self.num_classes).clone()  # counts
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            preds, targets = zip(*self._seen) if self._seen else ([empty], [empty])
            self.last_predictions, self.last_targets = torch.cat(preds), torch.cat(targets)
            self._seen = []
        self._reset_counts()
        return {f"{prefix}/{name}": value for name, value in zip(self.NAMES, values)}

    def state_dict(self) -> dict:
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._predict()
        return {"counts": dict(self.counts),
                "losses": self.pending_losses(), "sizes": [t.numel() for t in self._targets],
                "preds": torch.cat(self._preds) if self._preds else empty,
                "targets": torch.cat(self._targets) if self._targets else empty}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s form, and only that: another (a development version's, with torchmetrics'
        states) is refused in one line."""
        counts = state.get("counts") if isinstance(state, dict) else None
        if not (isinstance(counts, dict) and counts.keys() == self.counts.keys() and
                {"losses", "sizes", "preds", "targets"} <= state.keys()):
            keys = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise UserError(f"the checkpoint's unfinished epoch metrics ({keys}) are not of this version's form; "
                            "resume a checkpoint written at an epoch's end, or start the run again")
        self.counts = {key: value.to(self.device, self.counts[key].dtype) for key, value in counts.items()}
        self._losses = list(state["losses"].to(self.device).unbind())
        self._preds, self._logits, self._logit_values = [state["preds"].to(self.device)], [], 0
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
