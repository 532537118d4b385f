"""Where the project's own files are, and the `${root_dir:}` resolver the configs use.

Registering a resolver is process state (OmegaConf's registry), so importing this module does not do it: every
entry point (train.py, eval.py, the scripts) calls `register_resolvers()` before Hydra composes a config, and so
does the library before it composes one itself (config.py). A config that names `${root_dir:}` then resolves the
same whichever command reads it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/trainer/paths.py -> the checkout
CONFIG_DIR = REPO_ROOT / "configs"  # the installed config options: the only source of `_target_`s



def register_resolvers() -> None:
    """Register `${root_dir:}` (the checkout's root), once; calling it again changes nothing."""
    if not OmegaConf.has_resolver("root_dir"):
        OmegaConf.register_new_resolver("root_dir", lambda: str(REPO_ROOT))
