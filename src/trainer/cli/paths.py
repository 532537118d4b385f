"""Where the shipped configs are, where a command's files go, and how the command is spelt back to the user.

Installed from a wheel, the repository's configs/ is the package `trainer.configs` (pyproject.toml maps it when the
wheel is built) and Hydra finds it as `pkg://trainer.configs`; in a checkout (an editable install) it is configs/
itself. Either way there is one copy.

`${root_dir:}`, which the configs use for `outputs/` and `data/`, is the folder the command was started from: a
user's project folder, or the checkout for `python train.py` run there. `${sweep_dir:}` is a sweep's directory in
a job of `-m`, else null (configs/logger/mlflow.yaml: a sweep's jobs are children of one MLflow run). Registering a
resolver, like the schemas
in Hydra's ConfigStore (schema.py), is process state, so importing this module does not do it: every command calls
`prepare_hydra()` before Hydra composes a config, and so does the library before it composes one itself
(config.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

_PACKAGE = Path(__file__).resolve().parent.parent  # src/trainer/cli/paths.py -> src/trainer
_SHIPPED = _PACKAGE / "configs"  # present in an installed wheel only
REPO_ROOT = _PACKAGE.parents[1]  # src/trainer -> the checkout (in a checkout)
CONFIG_DIR = _SHIPPED if _SHIPPED.is_dir() else REPO_ROOT / "configs"  # the shipped options
CONFIG_SOURCE = "pkg://trainer.configs" if _SHIPPED.is_dir() else str(CONFIG_DIR)  # as Hydra's search path names it


def prepare_hydra() -> None:
    """Register `${root_dir:}` (the current folder) and the options' schemas, which the configs name; calling it
    again changes nothing."""
    from trainer.cli import schema

    if not OmegaConf.has_resolver("root_dir"):
        OmegaConf.register_new_resolver("root_dir", os.getcwd)
    if not OmegaConf.has_resolver("sweep_dir"):
        OmegaConf.register_new_resolver("sweep_dir", sweep_dir)
    schema.register()


def sweep_dir() -> str | None:
    """`${sweep_dir:}`: `hydra.sweep.dir` in a job of a sweep (`-m`), None in a single run, whose
    `hydra.sweep.dir` resolves too (to a new timestamp each time: a resumed run would see its config change)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)


def command_line(torchrun: str | None = None, script: str | None = None) -> str:
    """How the user starts this command (or the command `script`, e.g. train), with the `--config-dir` it was given:
    `python train.py` or `python scripts/lr_find.py` in a checkout, `htt-train` installed; under torchrun
    (`torchrun` holds its options, e.g. --nproc_per_node=2) `torchrun --nproc_per_node=2 train.py` or
    `torchrun --nproc_per_node=2 --no-python htt-train`."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith(".py"):  # a checkout's script; lr_find.py is in scripts/, train.py beside scripts/
        folder = Path(argv0).parent
        program = argv0 if script is None else str((folder.parent if folder.name == "scripts" else folder) /
                                                    f"{script}.py")
        launcher = f"torchrun {torchrun} {program}" if torchrun else f"python {program}"
    else:
        program = Path(argv0).name if script is None else f"htt-{script.replace('_', '-')}"
        launcher = f"torchrun {torchrun} --no-python {program}" if torchrun else program
    return shlex.join([*shlex.split(launcher), *_config_dir_options()])


def given_config_dirs() -> list[Path]:
    """The folders this command was given with --config-dir (absolute), in Hydra's order; none outside a command."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [Path(source.path) for source in HydraConfig.get().runtime.config_sources
            if source.provider == "command-line" and source.schema == "file"]


def _config_dir_options() -> list[str]:
    """`--config-dir DIR` for each folder the command was given (relative to the current folder, where it is in it)."""
    return [option for path in given_config_dirs() for option in
            ("--config-dir", str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path))]
