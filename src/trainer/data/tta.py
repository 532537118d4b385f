"""Test-time augmentation: a classifier's softmax averaged over fixed views of each image, batched on the device.

`tta=[hflip,shift]` (eval.py, predict.py --tta) names views made from the training augmentations of the dataset:
`hflip` the left-right mirror, `shift` four translations (up, down, left, right) by the training shift
(`dataset.augment_shift`, filled with 0 as training fills; or `dataset.random_crop`, by reflection as training
crops; 1 pixel with reflection when the model trained with neither). The original image is always one view; the
views of all names are taken together (tta=[hflip,shift]: 1 + 1 + 4 = 6). Off by default: a mirrored digit is
another glyph, so hflip is wrong for MNIST-like data, and a view the model never saw in training rarely helps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

TTA_VIEWS = {"hflip": 1, "shift": 4}  # name: how many views it adds


def check_tta(names: object) -> list[str]:
    """`tta` as a list of known view names (None or [] for none), or UserError naming the unknown one."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise UserError(f"tta={names!r}: must be a list of view names, such as tta=[hflip,shift] "
                        f"({', '.join(TTA_VIEWS)})")
    for name in names:
        if name not in TTA_VIEWS:
            raise UserError(f"tta: unknown view {name!r}; the views are {', '.join(TTA_VIEWS)}")
    return list(dict.fromkeys(names))


def shift_of(augment_shift: int, random_crop: int) -> tuple[int, str]:
    """The shift views' size and fill from the training augmentations: (pixels, "zeros" or "reflect")."""
    if augment_shift:
        return augment_shift, "zeros"
    return (random_crop or 1), "reflect"


class TestTimeAugmentation(nn.Module):
    """`model` on every view of a batch in one forward pass; returns log(mean softmax) (B, K): logits whose softmax
    is the views' mean probability, so losses, metrics and predictions take it as they take logits.

    Works on normalised images (B, C, H, W); `zero` (C, 1, 1) is what a pixel of 0 becomes after normalisation
    (the fill of a zero-filled shift)."""

    def __init__(self, model: nn.Module, views: list[str], shift: int = 1, fill: str = "reflect",
                 zero: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.views, self.shift, self.fill = model, check_tta(views), shift, fill
        self.register_buffer("zero", torch.zeros(1, 1, 1) if zero is None else zero.reshape(-1, 1, 1).float())

    @property
    def num_views(self) -> int:
        return 1 + sum(TTA_VIEWS[v] for v in self.views)

    def _shifted(self, x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        """x moved by (dy, dx) pixels, the uncovered edge filled as training fills it."""
        s = self.shift
        if self.fill == "reflect":
            padded = F.pad(x, (s, s, s, s), mode="reflect")  # (B, C, H+2s, W+2s)
        else:
            padded = F.pad(x - self.zero, (s, s, s, s)) + self.zero  # fill: the normalised value of a 0 pixel
        h, w = x.shape[-2:]
        return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        views = [x]
        if "hflip" in self.views:
            views.append(x.flip(3))
        if "shift" in self.views:
            views += [self._shifted(x, dy, dx) for dy, dx in ((-self.shift, 0), (self.shift, 0), (0, -self.shift),
                                                              (0, self.shift))]
        b = x.shape[0]
        logits = self.model(torch.cat(views).contiguous(memory_format=_format(x)))  # (V*B, K)
        probs = logits.float().softmax(dim=1).view(len(views), b, -1)  # (V, B, K)
        return probs.mean(dim=0).clamp(min=1e-12).log()  # (B, K)


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format


def with_tta(model: nn.Module, views: list[str], *, augment_shift: int, random_crop: int, mean: list[float],
             std: list[float], task: str = "classification") -> nn.Module:
    """`model` averaged over `views` (see the module docstring), for images normalised by `mean` and `std`; the
    model itself when `views` is empty. `augment_shift`, `random_crop`: the training run's, which the shift views
    follow. Only a classifier's probabilities are averaged: UserError for another `task`."""
    views = check_tta(views)
    if not views:
        return model
    if task != "classification":
        raise UserError(f"tta={views}: test-time augmentation averages class probabilities; the model's task is "
                        f"{task} (leave tta out)")
    shift, fill = shift_of(augment_shift, random_crop)
    zero = torch.tensor([-m / s for m, s in zip(mean, std)])  # (C,) a 0 pixel, normalised
    return TestTimeAugmentation(model, views, shift, fill, zero).to(next(model.parameters()).device).eval()


def describe(model: nn.Module) -> str:
    """The views of a TestTimeAugmentation in words, for the log."""
    if not isinstance(model, TestTimeAugmentation):
        return "off"
    parts = ["the original"] + (["its mirror"] if "hflip" in model.views else []) + (
        [f"4 shifts of {model.shift} px ({'filled with 0' if model.fill == 'zeros' else 'reflected'})"]
        if "shift" in model.views else [])
    return f"{model.num_views} views: " + ", ".join(parts) + "; softmax averaged"
