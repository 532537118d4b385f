"""Hydra-driven PyTorch training framework: in-memory data, a short Trainer, safe checkpoints."""

__all__ = ["Trainer", "TrainerOptions", "defaults"]


def __getattr__(name: str):
    # Lazy, so that `trainer.cli.allocator` can be imported (and re-execute the process) before torch is.
    if name == "Trainer":
        from trainer.loop.trainer import Trainer

        return Trainer
    if name == "TrainerOptions":
        from trainer.loop.options import TrainerOptions

        return TrainerOptions
    if name == "defaults":
        from trainer.cli.options import defaults

        return defaults
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
