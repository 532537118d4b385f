"""Seeding every RNG, and torch's deterministic kernels."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from trainer.errors import require_int


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    require_int("seed", seed, 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Make kernels deterministic (bitwise-repeatable runs) at some speed cost, or let them be fast."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
