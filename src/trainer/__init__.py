"""Hydra-driven PyTorch training framework: in-memory data, a short Trainer, safe checkpoints."""

__all__ = ["Trainer", "defaults"]


def __getattr__(name: str):
    # Lazy, so that `trainer.allocator` can be imported (and re-execute the process) before torch is.
    if name == "Trainer":
        from trainer.trainer import Trainer

        return Trainer
    if name == "defaults":
        from trainer.options import defaults

        return defaults
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
