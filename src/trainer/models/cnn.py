import torch
from torch import nn

from trainer.errors import UserError, require_bool
from trainer.models.activation import activation as make_activation


class CNN(nn.Module):
    """Convolutional network: per stage `convs_per_stage` x (Conv(k, same padding) [+ BatchNorm] + activation),
    then MaxPool(2); then Dropout, Linear(hidden), activation, Dropout, Linear(classes).

    `pool_first`: each stage's last convolution is max-pooled at once, and its batch norm and activation run on
    the 4x smaller map (airbench's order). For ReLU without batch norm that is the same function; with batch
    norm the statistics are those of the pooled map. On CPU it trains about 1.5x faster, since these
    element-wise passes, not the convolutions, are most of an MNIST-sized step."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: list[int], kernel_sizes: list[int],
                 hidden: int, dropout: float, batch_norm: bool, activation: str,
                 convs_per_stage: int, pool_first: bool) -> None:
        super().__init__()
        if len(channels) != len(kernel_sizes) or not channels:
            raise UserError(f"model.channels={list(channels)} and model.kernel_sizes={list(kernel_sizes)} "
                            "must be non-empty lists of the same length")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in channels):
            raise UserError(f"model.channels={list(channels)}: must be positive integers")
        if not all(k % 2 == 1 and k > 0 for k in kernel_sizes):
            raise UserError(f"model.kernel_sizes={list(kernel_sizes)}: must be odd positive integers")
        if not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout}: must be in [0, 1)")
        if isinstance(convs_per_stage, bool) or not isinstance(convs_per_stage, int) or convs_per_stage < 1:
            raise UserError(f"model.convs_per_stage={convs_per_stage!r}: must be an integer >= 1")
        require_bool("model.pool_first", pool_first)
        require_bool("model.batch_norm", batch_norm)
        c, h, w = in_shape
        if h >> len(channels) < 1 or w >> len(channels) < 1:
            raise UserError(f"model.channels: {len(channels)} pooling stages shrink a {h}x{w} input to nothing")
        stages: list[nn.Module] = []
        for out, k in zip(channels, kernel_sizes):
            for i in range(convs_per_stage):
                stages.append(nn.Conv2d(c, out, k, padding=k // 2, bias=not batch_norm))
                pool_now = pool_first and i == convs_per_stage - 1
                if pool_now:
                    stages.append(nn.MaxPool2d(2))
                if batch_norm:
                    stages.append(nn.BatchNorm2d(out))
                stages.append(make_activation(activation))
                c = out
            if not pool_first:
                stages.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*stages)  # (B, C, H, W) -> (B, c, h, w)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, hidden),
            make_activation(activation), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))
