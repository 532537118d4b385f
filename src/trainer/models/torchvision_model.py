"""Any classifier of `torchvision.models` by name, fitted to the dataset's channels, image size and classes."""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError

SMALL = 64  # images at most this wide lose the stem's first downsampling (the CIFAR adaptation of ResNets)


def torchvision_model(in_shape: tuple[int, ...], num_classes: int, name: str, weights: str | None) -> nn.Module:
    """`torchvision.models.get_model(name)` with `num_classes` outputs, its first convolution taking the images'
    channel count and, for small images (<= 64 pixels), stride 1 and no max-pool after it, so a 32x32 image is not
    reduced to 1x1 before the last stage. `weights` (e.g. DEFAULT or IMAGENET1K_V1) loads torchvision's pretrained
    weights (a download); the final linear layer is then replaced for `num_classes`."""
    import torchvision.models as tvm

    classifiers = tvm.list_models(module=tvm)
    if name not in classifiers:
        raise UserError(f"model.name={name}: not an image classifier of torchvision.models; use one of "
                        f"{', '.join(classifiers)}")
    c, h, w = in_shape
    if weights is None:
        model = tvm.get_model(name, num_classes=num_classes)
    else:
        try:
            model = tvm.get_model(name, weights=weights)
        except (ValueError, KeyError):
            names = ", ".join(["DEFAULT", *(x.name for x in tvm.get_model_weights(name))])
            raise UserError(f"model.weights={weights}: not weights of {name}; use one of {names}, or null") from None
        except OSError as e:  # URLError, no network, a full disk
            raise UserError(f"model.weights={weights}: could not download {name}'s weights ({e}); train from "
                            "scratch with model.weights=null") from None
        _replace(model, _last(model, nn.Linear), lambda old: nn.Linear(old.in_features, num_classes))
    small = max(h, w) <= SMALL
    _replace(model, _first(model, nn.Conv2d), lambda old: _adapted_conv(old, c, small))
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):  # ResNet-style stems
        model.maxpool = nn.Identity()
    _probe(model, name, in_shape, num_classes)
    return model


def _probe(model: nn.Module, name: str, in_shape: tuple[int, ...], num_classes: int) -> None:
    """Run one blank image through the model, so a size it cannot take fails here, in one line, not mid-epoch."""
    model.eval()  # eval: batch-norm statistics stay untouched
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *in_shape))
    except RuntimeError as e:
        raise UserError(f"model.name={name} cannot take {in_shape[1]}x{in_shape[2]} images ("
                        f"{' '.join(str(e).split())[:160]}); pick another model or set dataset.image_size") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        raise UserError(f"model.name={name} returns {type(out).__name__}, not (batch, {num_classes}) logits")


def _adapted_conv(old: nn.Conv2d, channels: int, small: bool) -> nn.Conv2d:
    if old.in_channels == channels and not small:
        return old
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, 1 if small else old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    # Pretrained filters stay useful on grey images: summed over RGB they respond as they did to colour.
    weight = old.weight.data.sum(dim=1, keepdim=True) if channels == 1 else old.weight.data
    if weight.shape == new.weight.shape:
        new.weight.data.copy_(weight)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data)
    return new


def _first(model: nn.Module, kind: type) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, kind))


def _last(model: nn.Module, kind: type) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, kind)][-1]


def _replace(model: nn.Module, dotted: str, make) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(getattr(parent, child)))
