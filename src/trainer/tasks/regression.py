"""Regression: one or more numbers per image, (N, D) float targets; MSE, L1, Huber or Poisson NLL."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from trainer.errors import UserError, require_bool
from trainer.tasks.base import SumMetrics, Task

log = logging.getLogger(__name__)

MAX_POINTS = 4096  # (true, predicted) pairs kept per evaluation for the scatter picture


class Regression(Task):
    """Numbers per image: the model outputs D values, one per target column (`classes` names them).

    `normalize`: train on standardised targets (the training split's mean and standard deviation per column),
    which keeps the loss and the learning rate of the same scale whatever the targets' unit; metrics, eval and
    predict are in the user's units (the checkpoint stores the scale). Not under Poisson NLL, whose outputs are
    the log-rates of the counts themselves (exp(output) is the prediction).
    """

    name = "regression"
    targets = "values"
    losses = ("mse", "l1", "huber", "poisson_nll")
    higher_is_better = ("r2",)
    lower_is_better = ("loss", "mae", "rmse")
    export_output = "float32 values (batch, columns) in the targets' units"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = require_bool("task.normalize", normalize)
        self.mean: list[float] | None = None  # the targets' scale, per column, once fitted
        self.std: list[float] | None = None
        self.link = "identity"  # exp: the outputs are log-rates (Poisson NLL with log_input)
        self._head: ToUnits | None = None  # to_units' module, for the scale above

    def fit(self, targets: torch.Tensor, loss_fn: nn.Module | None = None) -> None:
        """The scale of the training split's (N, D) targets, and whether the loss compares them standardised."""
        poisson = isinstance(loss_fn, nn.PoissonNLLLoss)
        if poisson:
            low = float(targets.min()) if targets.numel() else 0.0
            if low < 0:
                raise UserError(f"loss=PoissonNLLLoss: the training targets hold {low:g}, a negative value; Poisson "
                                "NLL is for counts (>= 0): use loss=mse, l1 or huber")
            self.link = "exp" if loss_fn.log_input else "identity"
        on = self.normalize and not poisson
        if poisson and self.normalize:
            log.info("loss=PoissonNLLLoss: the targets are counts, compared as they are (task.normalize does not "
                     "apply)")
        t = targets.double()
        mean, std = (t.mean(0), t.std(0, correction=0)) if on and len(t) else (None, None)
        self.mean = mean.tolist() if mean is not None else None
        self.std = std.clamp(min=1e-12).tolist() if std is not None else None  # a constant column: no scaling
        self._head = None

    def loss(self, loss_fn: nn.Module) -> nn.Module:
        return loss_fn if self.mean is None else StandardisedLoss(loss_fn, self.mean, self.std)

    def to_units(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs (B, D) as predictions in the targets' units."""
        head = self._head
        if head is None or head.mean.device != outputs.device:  # built once per device, not per flush
            head = self._head = self.export_head().to(outputs.device)
        return head(outputs.float())

    def export_head(self) -> nn.Module:
        return ToUnits(self.mean, self.std, self.link)

    def metrics(self, split: str, *, data: Any, device: torch.device, top_k: int | None, full: bool,
                extra: dict[str, Any] | None = None) -> RegressionMetrics:
        return RegressionMetrics(data.classes, device, self.to_units, keep_points=split != "train",
                                 extra=None if split == "train" else extra)

    def predictions(self, outputs: torch.Tensor, names: Sequence[str], top: int) -> list[list[tuple[int, str, float]]]:
        values = self.to_units(outputs).tolist()  # (B, D)
        return [[(i, names[i], v) for i, v in enumerate(row)] for row in values]

    def value_text(self, value: float) -> str:
        return f"{value:.6g}"

    def state_dict(self) -> dict:
        return {"name": self.name, "normalize": self.normalize, "mean": self.mean, "std": self.std,
                "link": self.link}

    @classmethod
    def from_state(cls, state: dict, where: str) -> Regression:
        task = cls()
        mean, std, link = state.get("mean"), state.get("std"), state.get("link")
        numbers = (mean is None and std is None) or (
            isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and
            all(isinstance(v, float) and math.isfinite(v) for v in mean + std) and min(std) > 0)
        if not numbers or link not in ("identity", "exp"):
            raise UserError(f"{where}: its regression scale is not a pair of equal lists of finite numbers (std > 0) "
                            "with a link of identity or exp; this framework writes none such")
        task.mean, task.std, task.link = mean, std, link
        return task


class ToUnits(nn.Module):
    """Outputs (B, D) to predictions in the targets' units: exp() of log-rates, or outputs * std + mean."""

    def __init__(self, mean: list[float] | None, std: list[float] | None, link: str) -> None:
        super().__init__()
        self.exp = link == "exp"
        self.register_buffer("mean", torch.tensor(mean if mean is not None else 0.0, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std if std is not None else 1.0, dtype=torch.float32))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.exp() if self.exp else outputs * self.std + self.mean


class StandardisedLoss(nn.Module):
    """`loss_fn` on standardised targets: (targets - mean) / std per column, the model's outputs as they are."""

    def __init__(self, loss_fn: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))  # (D,)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, (targets - self.mean) / self.std)


class RegressionMetrics(SumMetrics):
    """MAE, RMSE and R² in the targets' units (the mean over columns, and per column when there are several).
    `keep_points`: keep the first MAX_POINTS (true, predicted) pairs for the scatter picture (evaluation)."""

    def __init__(self, columns: Sequence[str], device: torch.device, to_units: Any, keep_points: bool = False,
                 extra: dict[str, Any] | None = None) -> None:
        self.columns, self.to_units, self.keep_points = list(columns), to_units, keep_points
        self.points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_points: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, D) true, (n, D) predicted, CPU
        super().__init__(device, extra)

    def names(self, prefix: str) -> tuple[str, ...]:
        names = ["mae", "rmse", "r2"]
        if len(self.columns) > 1:
            names += [f"{m}/{c}" for m in ("mae", "rmse", "r2") for c in self.columns]
        return tuple(f"{prefix}/{n}" for n in ["loss", *names, *self.extra])

    def _extra_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchmetrics' regression metrics compare predictions with targets in the same units: the user's
        predicted = self.to_units(outputs)
        return (predicted.squeeze(1), targets.squeeze(1)) if predicted.shape[1] == 1 else (predicted, targets)

    def _zero_counts(self) -> dict[str, torch.Tensor]:
        d = len(self.columns)
        return {k: torch.zeros(d, dtype=self.sum_dtype, device=self.device) for k in ("n", "abs", "sq", "y", "yy")}

    def _accumulate(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        predicted = self.to_units(outputs).to(self.sum_dtype)  # (n, D)
        y = targets.to(self.sum_dtype)
        error = predicted - y
        c = self.counts
        c["n"] += len(y)
        c["abs"] += error.abs().sum(0)
        c["sq"] += (error * error).sum(0)
        c["y"] += y.sum(0)
        c["yy"] += (y * y).sum(0)
        kept = sum(len(t) for t, _ in self.points)
        if self.keep_points and kept < MAX_POINTS:
            self.points.append((y[:MAX_POINTS - kept].float(), predicted[:MAX_POINTS - kept].float()))

    def _values(self, counts: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        if self.keep_points:
            self.last_points = (torch.cat([t for t, _ in self.points]).cpu(), torch.cat([p for _, p in self.points]
                                                                                        ).cpu()) \
                if self.points else None
            self.points = []
        n = counts["n"].clamp(min=1)
        mae, rmse = counts["abs"] / n, (counts["sq"] / n).sqrt()
        spread = counts["yy"] - counts["y"] ** 2 / n  # (D,) the targets' sum of squares about their mean
        r2 = torch.where(spread > 0, 1 - counts["sq"] / spread.clamp(min=1e-300), torch.nan)
        empty = not bool(counts["n"].sum())
        found = {}
        for name, per_column in (("mae", mae), ("rmse", rmse), ("r2", r2)):
            found[f"{prefix}/{name}"] = math.nan if empty else float(per_column.nanmean())
            if len(self.columns) > 1:
                found.update({f"{prefix}/{name}/{c}": float(v) for c, v in zip(self.columns, per_column)})
        return found
