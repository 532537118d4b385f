"""Where the project's own files are, and the `${root_dir:}` resolver the configs use.

Every entry point (train.py, eval.py, the scripts) imports this module through the package, so the
resolver is registered before Hydra resolves a config: a config that names `${root_dir:}` resolves
the same whichever command reads it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/trainer/paths.py -> the checkout
CONFIG_DIR = REPO_ROOT / "configs"  # the installed config options: the only source of `_target_`s

OmegaConf.register_new_resolver("root_dir", lambda: str(REPO_ROOT), replace=True)
