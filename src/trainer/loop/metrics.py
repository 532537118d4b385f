"""Epoch metrics, accumulated on the device as counts, and `evaluate`.

Every split: mean loss, accuracy, macro F1, balanced accuracy and (with more classes than `top_k`) top-k
accuracy. Evaluation with `full` (the test, eval.py, and validation under `trainer.full_val_metrics`) adds
per-class precision, recall and F1, one-vs-rest AUROC (macro and per class) and the expected calibration error.

Everything is a count or a sum on the device (per class: true positives, false positives, false negatives; the
loss sum; top-k hits; histograms of scores for AUROC and of confidences for ECE), so ranks add theirs with one
all-reduce and a checkpoint holds an unfinished epoch exactly. The definitions are torchmetrics': MeanMetric,
MulticlassAccuracy (micro; top_k; macro, which is the balanced accuracy), MulticlassF1Score/Precision/Recall
(a class neither predicted nor present does not count towards a macro mean), MulticlassAUROC and
MulticlassCalibrationError (15 bins, l1); tests/test_metrics.py checks each against it. AUROC is read off a
histogram of each class's log-odds (bins 1/128 wide up to 64 classes, wider beyond): exact up to ties within a
bin, at a memory bounded whatever the number of samples; log-odds, not probabilities, because a confident
model's probabilities crowd within 1e-4 of 1. Why not torchmetrics itself: importing it costs 2.3 s and 230 MiB
in every process (it imports torchvision, torch._dynamo and scipy.signal), most of the time before a run's first
step (docs/performance.md "Memory and start-up"); a metric of torchmetrics can still be added by `_target_`
(`extra`, configs/metrics/), and only then is it imported.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as td

from trainer.errors import UserError, require_bool, require_int

log = logging.getLogger(__name__)

MAX_PENDING_LOGITS = 2**22  # 16 MiB of float32 logits held before they are reduced to predictions
ECE_BINS = 15  # torchmetrics' default for MulticlassCalibrationError
LOG_ODDS_RANGE = 64.0  # AUROC's histogram covers log-odds in [-64, 64]; beyond, scores tie in the end bins
MAX_AUROC_BINS, MAX_AUROC_CELLS = 2**14, 2**20  # bins per class; classes x bins (x2, int64: 16 MiB at most)


@dataclass(frozen=True)
class MetricOptions:
    """What the epoch metrics measure beyond loss, accuracy, macro F1 and balanced accuracy.

    top_k: also `acc_top<k>` when there are more classes than k (None: off). full_val_metrics: validation also
    measures what the test does (per-class precision, recall and F1, AUROC, ECE), so `trainer.monitor` may name it.
    """

    top_k: int | None
    full_val_metrics: bool

    def validate(self) -> None:
        if self.top_k is not None:
            require_int("trainer.top_k", self.top_k, 1)
        require_bool("trainer.full_val_metrics", self.full_val_metrics)


def metric_key(name: str) -> str:
    """A class name as one component of a metric key: TensorBoard, MLflow and summarize.py split keys at `/`."""
    return name.replace("/", "-")


class EpochMetrics:
    """The epoch metrics of one split, accumulated on the device.

    `add` only buffers a batch's results on the device; they reach the counts in one update per `flush`
    (per-batch metric updates cost more than a small model's whole step). `compute()` is the only host sync
    (and, on CUDA, each flush's bincount); under torchrun it sums the counts of every rank. `state_dict()` holds
    the buffer too, so a run resumed mid-epoch ends the epoch with exactly the numbers of a run that never
    stopped. `classes` names the per-class keys (`f1/<class>`); `extra`: torchmetrics metrics (or any object with
    update(logits, targets), compute() and reset()) by name, updated every batch: evaluation only.
    """

    NAMES = ("loss", "acc", "f1", "balanced_acc")  # what every split reports, <prefix>/<name>

    def __init__(self, num_classes: int, device: torch.device, confusion_matrix: bool = False,
                 top_k: int | None = None, full: bool = False, classes: Sequence[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.num_classes, self.device, self.keeps_confusion = num_classes, device, confusion_matrix
        self.top_k = top_k if top_k is not None and top_k < num_classes else None  # k >= classes: always right
        self.full, self.extra = full, dict(extra or {})
        self.classes = [metric_key(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
        self.auroc_bins = max(16, min(MAX_AUROC_BINS, MAX_AUROC_CELLS // num_classes))
        # With confusion_matrix, compute() also sets last_confusion (rows: true class, columns: predicted) and
        # last_predictions/last_targets, (N,) each, this rank's samples in the order they were added; with full,
        # last_calibration: (count, confidence sum, correct sum) per confidence bin, CPU float64, (ECE_BINS + 1,)
        # each (the last bin holds confidence 1.0 exactly, as torchmetrics bins it).
        self.last_confusion: torch.Tensor | None = None
        self.last_predictions: torch.Tensor | None = None
        self.last_targets: torch.Tensor | None = None
        self.last_calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # flushed (preds, targets), with confusion_matrix
        self._top_k_unknown = False  # resumed from an epoch whose top-k hits were not counted (load_state_dict)
        self._reset_counts()
        self._losses: list[torch.Tensor] = []  # per-batch mean losses, scalars
        self._preds: list[torch.Tensor] = []  # predicted classes, 1-D, of the samples before those in _logits
        self._logits: list[torch.Tensor] = []  # (B_i, classes), not yet reduced to predictions
        self._logit_values = 0  # elements in _logits
        self._targets: list[torch.Tensor] = []  # (B_i,), of every batch since the last flush

    def names(self, prefix: str) -> tuple[str, ...]:
        """The keys `compute(prefix)` returns (a vector-valued extra metric adds `<name>/<i>` keys too)."""
        names = [*self.NAMES, *([f"acc_top{self.top_k}"] if self.top_k else [])]
        if self.full:
            names += ["auroc", "ece", *(f"{what}/{c}" for what in ("precision", "recall", "f1", "auroc")
                                        for c in self.classes)]
        names += list(self.extra)
        return tuple(f"{prefix}/{name}" for name in names)

    def _reset_counts(self) -> None:
        k, device = self.num_classes, self.device
        zeros = torch.zeros(k, dtype=torch.int64, device=device)
        self.counts = {"tp": zeros, "fp": zeros.clone(), "fn": zeros.clone(),  # (classes,) each
                       "loss_sum": torch.zeros((), device=device),  # sum over samples of the batch mean loss
                       "loss_weight": torch.zeros((), device=device),  # samples counted in loss_sum
                       "top_k": torch.zeros((), dtype=torch.int64, device=device)}  # samples right within top k
        if self.full:  # float32 sums: MPS has no float64
            self.counts["scores"] = torch.zeros(2 * k * self.auroc_bins, dtype=torch.int64, device=device)
            self.counts["calibration"] = torch.zeros(3 * (ECE_BINS + 1), device=device)  # count, confidence, correct
        self.confusion = (torch.zeros(k ** 2, dtype=torch.int64, device=device)
                          if self.keeps_confusion else None)  # (classes * classes,): true * classes + predicted

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        # Kept, and reduced in one argmax for many batches: one kernel a step less on the hot path.
        self._logits.append(logits.detach())
        self._logit_values += logits.numel()
        self._targets.append(targets)
        for metric in self.extra.values():
            metric.update(logits.detach(), targets)
        if self._logit_values > MAX_PENDING_LOGITS:
            self._reduce()

    def _reduce(self) -> None:
        """The pending logits to predictions, top-k hits and (full) the score and confidence histograms."""
        if not self._logits:
            return
        logits = torch.cat(self._logits)  # (n, classes)
        targets = torch.cat(self._targets[len(self._targets) - len(self._logits):])  # (n,), the same samples
        self._preds.append(logits.argmax(dim=1))  # (n,), each row as argmax of its batch
        if self.top_k:
            top = logits.topk(self.top_k, dim=1).indices  # (n, k)
            self.counts["top_k"] += (top == targets[:, None]).any(dim=1).sum()
        if self.full:
            self._histograms(logits.float(), targets)
        self._logits, self._logit_values = [], 0

    def _histograms(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """AUROC's per-class histograms of log-odds, split by positive and negative, and ECE's bins."""
        k, bins = self.num_classes, self.auroc_bins
        total = logits.logsumexp(dim=1, keepdim=True)  # (n, 1)
        log_p = logits - total  # (n, k)
        log_not_p = torch.log1p(-log_p.exp())  # (n, k) log(1 - p); inexact only where p is near 1: the top class
        top = logits.argmax(dim=1, keepdim=True)  # (n, 1)
        others = logits.scatter(1, top, float("-inf")).logsumexp(dim=1, keepdim=True) - total  # (n, 1)
        log_not_p = log_not_p.scatter(1, top, others)
        log_odds = (log_p - log_not_p).nan_to_num(0.0)  # (n, k); one class only: p = 1, no odds to rank
        cell = score_bins(log_odds, bins)
        positive = torch.nn.functional.one_hot(targets, k).bool()  # (n, k)
        index = torch.arange(k, device=logits.device) * bins + cell + positive.long() * (k * bins)  # (n, k)
        self.counts["scores"] += torch.bincount(index.flatten(), minlength=2 * k * bins)
        confidence, predicted = log_p.max(dim=1)  # (n,) each
        confidence = confidence.exp()
        edges = torch.linspace(0, 1, ECE_BINS + 1, device=logits.device)
        where = torch.bucketize(confidence, edges, right=True) - 1  # (n,) in 0..ECE_BINS
        # sums per bin as a product with the one-hot bins, (n, bins)^T @ (n, 3): deterministic on every device,
        # where a float scatter_add_ is not on CUDA (trainer.deterministic=true would refuse it)
        bins_of = torch.nn.functional.one_hot(where, ECE_BINS + 1).to(confidence.dtype)
        per_sample = torch.stack([torch.ones_like(confidence), confidence, (predicted == targets).float()], dim=1)
        self.counts["calibration"] += (bins_of.T @ per_sample).T.reshape(-1)  # count, confidence, correct

    @property
    def has_pending(self) -> bool:
        return bool(self._losses)

    def pending_losses(self) -> torch.Tensor:
        """The per-batch mean losses added since the last flush, (k,), consecutive batches in order."""
        return torch.stack(self._losses) if self._losses else torch.empty(0, device=self.device)

    def begin(self, forward: Forward, limit_batches: int | None = None) -> None:
        """Called by `evaluate` before the first batch (other tasks' metrics use it; classification's do not)."""

    def flush(self) -> None:
        if not self._losses:
            return
        sizes = [t.numel() for t in self._targets]
        c, k = self.counts, self.num_classes
        losses = torch.stack(self._losses).float()  # (batches,) batch means, weighted below by their sizes
        c["loss_sum"] += (losses * torch.tensor(sizes, dtype=losses.dtype, device=self.device)).sum()
        c["loss_weight"] += sum(sizes)
        self._reduce()
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
        recall = tp / (tp + fn).clamp(min=1)  # (classes,)
        present = (tp + fp + fn) > 0
        samples = (tp.sum() + fn.sum()).clamp(min=1)
        values = [c["loss_sum"] / c["loss_weight"],  # NaN with no sample, as torchmetrics
                  tp.sum() / samples, (f1 * present).sum() / present.sum().clamp(min=1),
                  (recall * present).sum() / present.sum().clamp(min=1)]
        top_k = self.top_k and not self._top_k_unknown
        if top_k:
            values.append(c["top_k"] / samples)
        if self.full:
            precision = tp / (tp + fp).clamp(min=1)
            values += [tp.new_zeros(2), precision, recall, f1]  # AUROC and ECE: from the CPU, below
        flat = torch.cat([v.reshape(-1).float() for v in values]).tolist()  # the host sync
        names = [n for n in self.names(prefix) if top_k or n != f"{prefix}/acc_top{self.top_k}"]
        found = dict(zip(names, flat))
        if self.full:
            found.update(self._auroc_and_ece(prefix))
        if self.confusion is not None:
            self.last_confusion = self.confusion.view(self.num_classes, self.num_classes).clone()  # counts
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            preds, targets = zip(*self._seen) if self._seen else ([empty], [empty])
            self.last_predictions, self.last_targets = torch.cat(preds), torch.cat(targets)
            self._seen = []
        found.update(computed_extra(self.extra, prefix))
        self._reset_counts()
        self._top_k_unknown = False
        return found

    def _auroc_and_ece(self, prefix: str) -> dict[str, float]:
        """Macro and per-class AUROC from the score histograms, ECE from the confidence bins (float64, CPU). A
        class with no positive or no negative sample has no AUROC (NaN), and the macro mean leaves it out."""
        k, bins = self.num_classes, self.auroc_bins
        auroc = histogram_auroc(self.counts["scores"].double().cpu().view(2, k, bins))  # (k,)
        defined = auroc[~auroc.isnan()]
        count, confidence, correct = self.counts["calibration"].double().cpu().view(3, ECE_BINS + 1)
        self.last_calibration = (count, confidence, correct)
        ece = float(((correct - confidence).abs()).sum() / count.sum()) if count.sum() else math.nan
        return {f"{prefix}/auroc": float(defined.mean()) if defined.numel() else math.nan, f"{prefix}/ece": ece,
                **{f"{prefix}/auroc/{c}": float(a) for c, a in zip(self.classes, auroc)}}

    def state_dict(self) -> dict:
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._reduce()
        return {"counts": dict(self.counts),
                "losses": self.pending_losses(), "sizes": [t.numel() for t in self._targets],
                "preds": torch.cat(self._preds) if self._preds else empty,
                "targets": torch.cat(self._targets) if self._targets else empty}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s form. A checkpoint from before top-k was counted has no `top_k` count: its
        epoch's top-k accuracy is left out (`acc_top<k>` is missing from that epoch's metrics, with a warning)
        where the epoch had begun, since its hits were never counted. Another form (a development version's, with
        torchmetrics' states) is refused in one line."""
        counts = state.get("counts") if isinstance(state, dict) else None
        if isinstance(counts, dict) and "top_k" not in counts and counts.keys() == self.counts.keys() - {"top_k"}:
            began = bool(len(state.get("sizes") or ())) or any(bool(v.any()) for v in counts.values()
                                                               if isinstance(v, torch.Tensor))
            if began and self.top_k:
                log.warning("the checkpoint's epoch began before top-k accuracy was counted: this epoch's "
                            "acc_top%d is left out", self.top_k)
                self._top_k_unknown = True
            counts = {**counts, "top_k": torch.zeros((), dtype=torch.int64)}
            state = {**state, "counts": counts}
        self.counts = restored_counts(state, self.counts, {"losses", "sizes", "preds", "targets"},
                                      "are not of this version's form; resume a checkpoint written at an epoch's "
                                      "end, or start the run again")
        self._losses = list(state["losses"].to(self.device).unbind())
        self._preds, self._logits, self._logit_values = [state["preds"].to(self.device)], [], 0
        self._targets = list(state["targets"].to(self.device).split(state["sizes"]))


def computed_extra(extra: dict[str, Any], prefix: str) -> dict[str, float]:
    """The values of the `metrics` group's metrics (torchmetrics', which sync the ranks themselves), each reset
    after: `<prefix>/<name>`, or `<prefix>/<name>/<i>` for each value of a vector-valued one."""
    found: dict[str, float] = {}
    for name, metric in extra.items():
        value = metric.compute()
        value = value.detach().float().reshape(-1).tolist() if isinstance(value, torch.Tensor) else [value]
        found.update({f"{prefix}/{name}": float(value[0])} if len(value) == 1 else
                     {f"{prefix}/{name}/{i}": float(v) for i, v in enumerate(value)})
        metric.reset()
    return found


def restored_counts(state: Any, counts: dict[str, torch.Tensor], buffers: set[str],
                    refusal: str) -> dict[str, torch.Tensor]:
    """A checkpoint's unfinished epoch counts, `state["counts"]`, on the devices and dtypes of `counts` (the
    metrics' own, whose keys and shapes they must have), `state` holding the `buffers` keys too; else UserError
    naming state's keys, then `refusal`."""
    stored = state.get("counts") if isinstance(state, dict) else None
    if not (isinstance(stored, dict) and stored.keys() == counts.keys() and buffers <= state.keys() and
            all(isinstance(v, torch.Tensor) and v.shape == counts[k].shape for k, v in stored.items())):
        keys = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"the checkpoint's unfinished epoch metrics ({keys}) {refusal}")
    return {key: value.to(counts[key].device, counts[key].dtype) for key, value in stored.items()}


def score_bins(scores: torch.Tensor, bins: int) -> torch.Tensor:
    """The histogram bin of each score (log-odds), (n, k) -> (n, k) int64 in [0, bins): 2 * LOG_ODDS_RANGE / bins
    wide, the scores beyond the range in the end bins."""
    return ((scores + LOG_ODDS_RANGE) * (bins / (2 * LOG_ODDS_RANGE))).floor().clamp(0, bins - 1).long()


def histogram_auroc(scores: torch.Tensor) -> torch.Tensor:
    """AUROC per class from score histograms (2, k, bins): negatives' counts, then positives', per bin, low scores
    first. A tie within a bin counts half, as in the ROC's trapezoid; NaN for a class without positives or
    negatives."""
    negative, positive = scores[0], scores[1]
    below = negative.cumsum(dim=1) - negative  # (k, bins) negatives scored lower than each bin
    pairs = positive.sum(1) * negative.sum(1)  # (k,)
    wins = (positive * (below + negative / 2)).sum(1)
    return torch.where(pairs > 0, wins / pairs.clamp(min=1), float("nan"))  # (k,)


def histogram_average_precision(scores: torch.Tensor) -> torch.Tensor:
    """Average precision per class from score histograms (2, k, bins), as torchmetrics' binned AP: the sum over
    thresholds, from the highest bin down, of the recall gained times the precision there. NaN for a class
    without positives."""
    negative, positive = scores[0].flip(1), scores[1].flip(1)  # (k, bins), high scores first
    tp, fp = positive.cumsum(1), negative.cumsum(1)
    total = positive.sum(1, keepdim=True)  # (k, 1)
    precision = tp / (tp + fp).clamp(min=1)
    ap = (positive / total.clamp(min=1) * precision).sum(1)  # recall gained at each bin: its positives / all
    return torch.where(total.squeeze(1) > 0, ap, float("nan"))


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
    """`metrics` over `loader` (its first `limit_batches`), keyed `<prefix>/loss` etc. The model must already be
    in eval mode."""
    metrics.begin(forward, limit_batches)  # an embedding's reference set, embedded by the weights evaluated
    for images, targets in itertools.islice(loader, limit_batches):
        logits, loss = forward(images, targets)
        metrics.add(loss, logits, targets)
    return metrics.compute(prefix)
