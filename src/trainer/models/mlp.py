import math

import torch
from torch import nn

from trainer.errors import UserError
from trainer.models.activation import activation as make_activation


class MLP(nn.Module):
    """Fully connected network: flatten, then [Linear, activation, Dropout] per hidden size, then Linear."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden_sizes: list[int],
                 activation: str, dropout: float) -> None:
        super().__init__()
        if not all(isinstance(h, int) and h > 0 for h in hidden_sizes):
            raise UserError(f"model.hidden_sizes={list(hidden_sizes)}: must be positive integers")
        if not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout}: must be in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), make_activation(activation), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.net(x)
