"""The model summary a run prints at its start: parameters, each layer's output shape, and MACs per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSummary:
    name: str
    params: int  # all parameters
    trainable: int  # those with requires_grad
    macs_per_image: int  # multiply-accumulates of one forward pass of one image
    layers: list[tuple[str, str, tuple[int, ...], int]]  # (name, class, output shape of one image, parameters)

    def text(self) -> str:
        """A fixed-width table: one line per layer, then the totals."""
        rows = [("layer", "type", "output shape", "params")] + [
            (name, kind, "x".join(map(str, shape)) or "scalar", f"{params:,}")
            for name, kind, shape, params in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]
        return "\n".join([*lines, f"{self.name}: {self.params:,} parameters ({self.trainable:,} trainable), "
                                  f"{self.macs_per_image / 1e6:.2f} M MACs per image"])


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level layers, with a Sequential opened one level (an MLP is one Sequential of layers)."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            out += [(f"{name}.{sub}", layer) for sub, layer in child.named_children()]
        else:
            out.append((name, child))
    return out


@torch.no_grad()
def summarize(model: nn.Module, example: torch.Tensor) -> ModelSummary:
    """Run `model` once in eval mode on `example`, (1, C, H, W) as the model gets it, to record each layer's
    output shape and count the MACs (torch.utils.flop_counter: 2 FLOPs per multiply-accumulate). The model's
    weights, buffers and training mode are left as they were; no random number is drawn."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: dict[str, tuple[int, ...]] = {}
    layers = _layers(model)
    hooks = [layer.register_forward_hook(lambda m, args, out, name=name: shapes.__setitem__(
        name, tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ())) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return ModelSummary(
        name=type(model).__name__, params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs_per_image=counter.get_total_flops() // 2 // example.shape[0],
        layers=[(name, type(layer).__name__, shapes.get(name, ()), sum(p.numel() for p in layer.parameters()))
                for name, layer in layers if name in shapes])
