"""Hydra-driven PyTorch training framework: in-memory data, a short Trainer, safe checkpoints."""

from trainer.trainer import Trainer

__all__ = ["Trainer"]
