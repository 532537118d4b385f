"""Hydra callbacks (registered under `hydra.callbacks` in configs/train.yaml)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RefuseExistingRunDir(Callback):
    """Stop before Hydra writes anything if the run (or sweep) directory already holds files or cannot be
    written. Hydra itself would reuse such a directory, overwriting an earlier run's `.hydra/` and log.

    Runs in `on_run_start` / `on_multirun_start`, i.e. before Hydra creates the directory, saves the
    config into it or opens the log file there.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_fresh_dir(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_fresh_dir(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _require_fresh_dir(path: Path, key: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        _fail(f"{key}={path} already exists and is not empty; a new run never writes into an earlier run's "
              "directory. Choose another directory, or continue that run with trainer.resume=<its checkpoint>")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        _fail(f"{key}={path}: cannot write there ({e.strerror or e}); choose a writable directory")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
