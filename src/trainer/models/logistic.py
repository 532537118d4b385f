import math

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: flatten, then one linear layer to class logits."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.linear(x.flatten(1))
