"""The task interface, and `SumMetrics`: epoch metrics kept as sums on the device, for the tasks beyond
single-label classification (whose `EpochMetrics` lives in trainer.loop.metrics)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.distributed as td
from torch import nn

from trainer.errors import UserError
from trainer.loop.metrics import computed_extra, restored_counts

MAX_PENDING_VALUES = 2**22  # outputs held on the device (16 MiB of float32) before they are reduced to sums
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images, targets -> out, loss


class Task:
    """What a run learns. A subclass is one option of the `task` group; the composition root builds it first and
    hands it to the dataset (`targets`), the model (`output_size`), the Trainer and the commands.

    `targets`: what the dataset reads as targets: "class" (int64 (N,) indices), "multi_hot" ((N, K) 0/1) or
    "values" ((N, D) floats). `losses`: the shipped loss options that fit, named in refusals. `higher_is_better`
    and `lower_is_better`: metric names (the part after `val/`) whose direction `trainer.mode` must follow.
    """

    name: ClassVar[str]
    targets: ClassVar[str] = "class"
    losses: ClassVar[tuple[str, ...]] = ()
    higher_is_better: ClassVar[tuple[str, ...]] = ()
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss",)

    def output_size(self, num_targets: int) -> int:
        """The model's output width for data with `num_targets` classes, labels or values."""
        return num_targets

    def fit(self, targets: torch.Tensor, loss_fn: nn.Module | None = None) -> None:
        """Learn what the task needs from the training split's targets (a regression's scale) and check them
        against `loss_fn`, before anything trains."""

    def check_loss(self, loss_fn: nn.Module, data: Any, device: torch.device) -> None:
        """Refuse, in one line, a loss that does not fit this task's targets, before anything trains."""
        fits = loss_tasks(loss_fn)
        if fits is not None and self.name not in fits:
            names = ", ".join(self.losses[:-1]) + " or " * (len(self.losses) > 1) + self.losses[-1]
            raise UserError(f"loss={type(loss_fn).__name__} is a loss for {' or '.join(fits)}, not task={self.name}; "
                            f"use loss={names} (or a loss of your own)")
        width = self.output_size(data.num_classes)
        outputs = torch.zeros(2, width, device=device)
        targets = self.blank_targets(2, data.num_classes, device)
        try:
            with torch.no_grad():  # not a training batch: settings that fail only when the loss is called
                self.loss(loss_fn)(outputs, targets)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"loss={type(loss_fn).__name__}: {' '.join(str(e).split())}") from None

    def blank_targets(self, n: int, num_targets: int, device: torch.device) -> torch.Tensor:
        """`n` targets of the form the dataset gives, for a trial call of the loss."""
        if self.targets == "class":
            return torch.arange(n, device=device) % max(num_targets, 1)
        return torch.zeros(n, num_targets, device=device)

    def loss(self, loss_fn: nn.Module) -> nn.Module:
        """The loss as the loop calls it (a regression wraps it to compare in normalised units)."""
        return loss_fn

    def metrics(self, split: str, *, data: Any, device: torch.device, top_k: int | None, full: bool,
                extra: dict[str, Any] | None = None) -> Any:
        """The epoch metrics of `split` (train, val or test): an object with add, flush, compute, names,
        has_pending, pending_losses, state_dict, load_state_dict and begin (see SumMetrics)."""
        raise NotImplementedError

    def predictions(self, outputs: torch.Tensor, names: Sequence[str], top: int) -> list[list[tuple[int, str, float]]]:
        """For each row of `outputs` (B, width), what predict.py prints: (index, name, value), best first; at most
        `top` of them where the task ranks (a class's probability, a label's, a class's distance)."""
        raise NotImplementedError

    def value_text(self, value: float) -> str:
        """One predicted value as predict.py prints it."""
        return f"{value:.1%}"

    export_output: ClassVar[str] = "float32 outputs (batch, width)"  # what an exported model returns (export.py)

    def export_head(self) -> nn.Module | None:
        """What an exported model applies after the trained one (a regression's scale back to the targets' units)."""
        return None

    def state_dict(self) -> dict:
        """What a checkpoint records of the task: its name and what `fit` learnt (plain values)."""
        return {"name": self.name}

    def load_fitted(self, state: dict | None, where: str) -> None:
        """On resume: what the checkpoint's task learnt that the run does not learn again before it is used."""

    @classmethod
    def from_state(cls, state: dict, where: str) -> Task:
        """The task as a checkpoint recorded it (`state_dict()`), for eval, predict and export."""
        return cls()

    def direction(self, metric: str) -> str | None:
        """'max' or 'min' for a metric of this task (`val/<name>[/<class>]`), None for one it does not know."""
        name = metric.split("/")[1]
        if name in self.lower_is_better or name.endswith("loss"):
            return "min"
        if name in self.higher_is_better or any(name.startswith(p) for p in ("acc_top", "recall_at_")):
            return "max"
        return None


def loss_tasks(loss_fn: nn.Module) -> tuple[str, ...] | None:
    """The tasks a loss of this project or torch fits (None: a loss of the user's own, tried by a call only)."""
    from trainer.loop import losses

    table: dict[type, tuple[str, ...]] = {
        nn.CrossEntropyLoss: ("classification",), nn.NLLLoss: ("classification",),
        losses.NLLOnLogSoftmax: ("classification",), nn.MultiMarginLoss: ("classification",),
        losses.CrossEntropy: ("classification",), losses.MultiMargin: ("classification",),
        losses.BCEOneVsRest: ("classification", "multilabel"), nn.BCEWithLogitsLoss: ("multilabel",),
        losses.MSE: ("classification", "regression"), nn.MSELoss: ("regression",), nn.L1Loss: ("regression",),
        nn.HuberLoss: ("regression",), nn.SmoothL1Loss: ("regression",), nn.PoissonNLLLoss: ("regression",),
        losses.MinedTripletLoss: ("embedding",), losses.PairwiseHingeEmbeddingLoss: ("embedding",),
        losses.ContrastiveLoss: ("embedding",),
        nn.TripletMarginLoss: ("embedding",), nn.HingeEmbeddingLoss: ("embedding",)}
    return table.get(type(loss_fn))


class SumMetrics:
    """The epoch metrics of one split as sums on the device, like EpochMetrics: `add` only buffers a batch;
    `flush` (once per log interval) reduces the buffer to the sums; `compute` is the one host sync and sums the
    ranks' counts under torchrun. `state_dict` holds the unreduced buffer too, so a run resumed mid-epoch ends the
    epoch with the numbers of a run that never stopped, bit for bit. A subclass gives `_zero_counts`,
    `_accumulate(outputs, targets)` and `_values(counts)` (float64 on the CPU), and `names`.
    """

    def __init__(self, device: torch.device, extra: dict[str, Any] | None = None) -> None:
        self.device, self.extra = device, dict(extra or {})
        self.sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self._losses: list[torch.Tensor] = []  # per-batch mean losses, scalars, since the last flush
        self._sizes: list[int] = []  # their batch sizes
        self._outputs: list[torch.Tensor] = []  # (B_i, width), not yet reduced to sums
        self._targets: list[torch.Tensor] = []  # the same samples' targets
        self._pending = 0
        self._reset_counts()

    def names(self, prefix: str) -> tuple[str, ...]:
        raise NotImplementedError

    def _zero_counts(self) -> dict[str, torch.Tensor]:
        return {}

    def _accumulate(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a chunk of samples to self.counts."""

    def _values(self, counts: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        return {}

    def begin(self, forward: Forward, limit_batches: int | None = None) -> None:
        """Called by `evaluate` before the split's first batch, with the model's forward pass."""

    def _extra_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a metric of the `metrics` group is updated with: the batch's outputs and targets as they are."""
        return outputs, targets

    def _reset_counts(self) -> None:
        self.counts = {"loss_sum": torch.zeros((), device=self.device),
                       "loss_weight": torch.zeros((), device=self.device), **self._zero_counts()}

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        self._sizes.append(len(targets))
        self._outputs.append(outputs.detach())
        self._targets.append(targets)
        self._pending += outputs.numel()
        if self.extra:
            given = self._extra_inputs(outputs.detach(), targets)
            for metric in self.extra.values():
                metric.update(*given)
        if self._pending > MAX_PENDING_VALUES:
            self._reduce()

    def _reduce(self) -> None:
        if self._outputs:
            self._accumulate(torch.cat(self._outputs).float(), torch.cat(self._targets))
        self._outputs, self._targets, self._pending = [], [], 0

    @property
    def has_pending(self) -> bool:
        return bool(self._losses)

    def pending_losses(self) -> torch.Tensor:
        """The per-batch mean losses added since the last flush, (k,), consecutive batches in order."""
        return torch.stack(self._losses) if self._losses else torch.empty(0, device=self.device)

    def flush(self) -> None:
        if not self._losses:
            return
        losses = torch.stack(self._losses).float()  # (batches,) batch means, weighted below by their sizes
        self.counts["loss_sum"] += (losses * torch.tensor(self._sizes, dtype=losses.dtype, device=self.device)).sum()
        self.counts["loss_weight"] += sum(self._sizes)
        self._reduce()
        self._losses, self._sizes = [], []

    def compute(self, prefix: str) -> dict[str, float]:
        self.flush()
        if td.is_available() and td.is_initialized():
            for t in self.counts.values():
                td.all_reduce(t)
        counts = {k: v.double().cpu() for k, v in self.counts.items()}  # the host sync
        found = {f"{prefix}/loss": float(counts["loss_sum"] / counts["loss_weight"]) if counts["loss_weight"]
                 else float("nan"), **self._values(counts, prefix), **computed_extra(self.extra, prefix)}
        self._reset_counts()
        return {name: found[name] for name in self.names(prefix) if name in found} | found

    def state_dict(self) -> dict:
        empty = torch.empty(0, device=self.device)
        return {"counts": dict(self.counts), "losses": self.pending_losses(), "sizes": list(self._sizes),
                "outputs": torch.cat(self._outputs) if self._outputs else empty,
                "targets": torch.cat(self._targets) if self._targets else empty}

    def load_state_dict(self, state: dict) -> None:
        self.counts = restored_counts(state, self.counts, {"losses", "sizes", "outputs", "targets"},
                                      "are not this task's; resume it with the task it was trained for")
        self._losses = list(state["losses"].to(self.device).unbind())
        self._sizes = [int(s) for s in state["sizes"]]
        outputs = state["outputs"].to(self.device)
        # restored as one chunk: the flush concatenates the chunks anyway, so its sums are the same, bit for bit
        self._outputs = [outputs] if outputs.numel() else []
        self._targets = [state["targets"].to(self.device)] if outputs.numel() else []
        self._pending = outputs.numel()


@torch.inference_mode()
def embed_all(forward: Forward, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
              limit_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs and the targets over `loader` (its first `limit_batches`): (N, width), (N, ...)."""
    outputs, targets = [], []
    for images, y in itertools.islice(loader, limit_batches):
        out, _ = forward(images, y)
        outputs.append(out.float())
        targets.append(y)
    if not outputs:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(outputs), torch.cat(targets)
