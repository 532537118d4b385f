"""Hydra callbacks (registered under `hydra.callbacks` in configs/train.yaml)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainer.run.files import CLAIM_MARKER


class RefuseExistingRunDir(Callback):
    """Stop before Hydra writes anything if the run (or sweep) directory already holds files, cannot be
    written, or is claimed by another run starting at the same moment. Hydra itself would reuse such a
    directory, mixing two runs' config, checkpoints, metrics and event files in one place.

    Runs in `on_run_start` / `on_multirun_start`, i.e. before Hydra creates the directory, saves the
    config into it or opens the log file there. The directory is claimed by creating, exclusively, the
    first thing Hydra puts into it: `<run dir>/.hydra/` (hydra.output_subdir) for a run, `multirun.yaml`
    for a sweep. Hydra creates those with exist_ok / overwrites them, so it carries on as usual.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        subdir = config.hydra.output_subdir
        claim = (partial(_make_dir, run_dir / subdir) if subdir is not None
                 else partial(_make_file, run_dir / CLAIM_MARKER, ""))
        claim_dir(run_dir, "hydra.run.dir", claim)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # The same text Hydra's basic sweeper saves there; other sweepers (Optuna) write none, so ours stays.
        claim_dir(sweep_dir, "hydra.sweep.dir",
                  partial(_make_file, sweep_dir / "multirun.yaml", OmegaConf.to_yaml(config)))


def claim_dir(path: Path, key: str, claim: Callable[[], None]) -> None:
    """Make `path` this run's, or exit 1 with one line on stderr. `claim` creates something inside `path`
    and raises FileExistsError if it is already there: of several processes claiming one directory at the
    same time, exactly one succeeds.

    Race-free because only `claim` decides. The emptiness check below is just the friendly refusal of an
    earlier run's directory: a directory another run has created but not yet claimed still looks empty
    here, so two racing runs may both pass it and both create `path` (exist_ok), but only one of their
    exclusive creates succeeds and the other stops before writing anything. No separate probe file
    tests writability (the claim does): a racing run could see one and take it for an earlier run's files.
    """
    try:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            _fail(f"{key}={path} already exists and is not empty; a new run never writes into an earlier run's "
                  "directory. Choose another directory, or continue that run with trainer.resume=<its checkpoint>")
        path.mkdir(parents=True, exist_ok=True)  # an empty directory may pre-exist (a user made it)
        claim()  # also the check that we can write there: it creates an entry in `path`
    except FileExistsError:
        _fail(f"{key}={path}: another run started at the same time has claimed this directory (or it appeared "
              "meanwhile); two runs never share one. Choose another directory for this run")
    except OSError as e:
        _fail(f"{key}={path}: cannot write there ({e.strerror or e}); choose a writable directory")


def _make_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # output_subdir may be nested: only its last part is the claim
    os.mkdir(path)  # atomic; FileExistsError if another process made it first


def _make_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # atomic; FileExistsError if it exists
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
