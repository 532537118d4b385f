"""Datasets built directly (without Hydra) in tests, with every key of configs/dataset_base/common.yaml."""

from __future__ import annotations

from typing import Any

import yaml

from trainer.cli.paths import CONFIG_DIR
from trainer.data import MNIST

COMMON: dict[str, Any] = yaml.safe_load((CONFIG_DIR / "dataset_base" / "common.yaml").read_text())


def common(**overrides: Any) -> dict[str, Any]:
    """The keys every dataset option takes, at their YAML defaults, with `overrides`."""
    return {**COMMON, **overrides}


def tiny_mnist(root: Any, cls: type = MNIST, **overrides: Any) -> Any:
    """An IDX dataset from local files only (no download, no MD5 check)."""
    return cls(**common(**{"root": str(root), "download": False, "mirror": None, "verify": False, **overrides}))
