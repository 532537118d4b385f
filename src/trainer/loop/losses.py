"""Losses that need more than raw logits. Each takes (logits (B, K), targets (B,)) like the built-in ones,
so models always return logits and the loss applies what it needs (log-softmax, softmax)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError, is_number


class NLLOnLogSoftmax(nn.Module):
    """Negative log-likelihood of log_softmax(logits) (numerically the same as cross-entropy)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(logits, dim=1), targets)


class MSEOnSoftmax(nn.Module):
    """Mean squared error between softmax(logits) and the one-hot targets (a Brier score)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1)  # (B, K)
        return F.mse_loss(probs, F.one_hot(targets, probs.shape[1]).to(probs.dtype))


class BCEOneVsRest(nn.Module):
    """One-vs-rest binary cross-entropy: each of the K logits is a sigmoid "is it this class?" against the one-hot
    target, averaged over the B x K outputs (torch's BCEWithLogitsLoss, numerically stable)."""

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        if pos_weight is not None and not (is_number(pos_weight) and math.isfinite(pos_weight) and pos_weight > 0):
            raise UserError(f"loss.pos_weight={pos_weight!r}: must be null or a finite number > 0")
        self.pos_weight = pos_weight  # weight of the one positive output against the K - 1 negatives; null: 1

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # (B, K)
        weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, one_hot, pos_weight=weight)
