"""Losses that need more than raw logits. Each takes (logits (B, K), targets (B,)) like the built-in ones,
so models always return logits and the loss applies what it needs (log-softmax, softmax)."""

import torch
import torch.nn.functional as F
from torch import nn


class NLLOnLogSoftmax(nn.Module):
    """Negative log-likelihood of log_softmax(logits) (numerically the same as cross-entropy)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(logits, dim=1), targets)


class MSEOnSoftmax(nn.Module):
    """Mean squared error between softmax(logits) and the one-hot targets (a Brier score)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1)  # (B, K)
        return F.mse_loss(probs, F.one_hot(targets, probs.shape[1]).to(probs.dtype))
