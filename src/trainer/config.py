"""Objects from config nodes: `build()` for every `_target_`, `model_from_checkpoint()` for a trained model.

train.py, eval.py and the scripts all make objects through these two, so a bad value reads the same
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import load_checkpoint
from trainer.data import IDXImageDataset
from trainer.errors import UserError


def build(node: DictConfig, **runtime: Any) -> Any:
    """`hydra.utils.instantiate` with plain containers, turning bad values into a one-line UserError."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **runtime)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            values = ", ".join(f"{k}={v}" for k, v in node.items() if k != "_target_")
            raise UserError(f"{node._key()}={node._target_.rsplit('.', 1)[-1]}({values}): {cause}") from None
        raise


@dataclass(frozen=True)
class TrainedModel:
    """A model rebuilt from a checkpoint, with its trained weights, in eval mode."""

    model: torch.nn.Module
    config: DictConfig  # the resolved config it was trained with
    dataset: type[IDXImageDataset]  # the dataset class whose images it takes: in_shape, classes, name
    epoch: int  # the epoch the checkpoint was written in


def model_from_checkpoint(ckpt: str | Path, device: torch.device | str = "cpu",
                          dataset: DictConfig | None = None) -> TrainedModel:
    """Rebuild the model in `ckpt` from the config stored with it, for images of its own dataset or of `dataset`.

    Raises UserError for an unreadable checkpoint, and for a `dataset` whose image shape or class count
    does not fit the model.
    """
    state = load_checkpoint(ckpt)
    trained = OmegaConf.create(state["config"])
    data_cls = get_class((dataset if dataset is not None else trained.dataset)._target_)
    model = build(trained.model, in_shape=data_cls.in_shape, num_classes=len(data_cls.classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"dataset={data_cls.name} ({len(data_cls.classes)} classes of {data_cls.in_shape} images) "
                        f"does not fit the model in {ckpt}, trained on "
                        f"{trained.dataset._target_.rsplit('.', 1)[-1]}") from None
    return TrainedModel(model.to(device).eval(), trained, data_cls, state["epoch"])
