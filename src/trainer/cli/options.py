"""The config options: which there are (the shipped configs and the folders given with --config-dir), the values
their YAML gives, and `defaults()`, those values for building objects in plain Python."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.core.hydra_config import HydraConfig

from trainer.cli.paths import CONFIG_DIR, given_config_dirs
from trainer.errors import UserError


@lru_cache(maxsize=None)
def read_yaml(path: Path) -> dict:
    """A config file's YAML (the project's own files, not untrusted input), {} where there is none."""
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def option_defaults(group: str, option: str, dirs: Sequence[Path]) -> dict:
    """An option file's keys, over those of the files its defaults list merges in (`/dataset_base/common@_here_`)."""
    raw = dict(read_yaml(option_file(group, option, dirs)) or {})
    merged: dict = {}
    for entry in raw.pop("defaults", None) or []:
        if isinstance(entry, str) and entry.endswith("@_here_") and not entry.startswith("/schema_"):
            merged.update(option_defaults(*entry.removesuffix("@_here_").strip("/").split("/", 1), dirs))
    return {**merged, **raw}


def defaults(group: str, option: str = "default", **changes: Any) -> dict[str, Any]:
    """The keyword arguments a shipped config option gives its class, with `changes`: for building objects in plain
    Python, with no Hydra (docs/python_api.md). `defaults("trainer", max_epochs=3)` is configs/trainer/default.yaml;
    `defaults("dataset", "custom")` the keys every dataset takes (configs/dataset_base/common.yaml).

    `${root_dir:}` reads as the current folder. A key the YAML leaves to be filled (`???`) or takes from another group
    (`max_lr: ${optimizer.lr}`) is left out unless `changes` gives it. An unknown option or key is a UserError.
    """
    if option not in options(group):
        raise UserError(f"{group}/{option}: no such option; {group} has {', '.join(options(group)) or 'none'}")
    values = {k: v for k, v in option_defaults(group, option, [CONFIG_DIR]).items() if not k.startswith("_")}
    unknown = sorted(set(changes) - set(values))
    if unknown:
        raise UserError(f"{group}/{option} has no key {unknown[0]!r}; it has {', '.join(sorted(values))}")
    for key, value in list(values.items()):
        if isinstance(value, str) and value.startswith("${root_dir:}"):
            values[key] = os.getcwd() + value.removeprefix("${root_dir:}")
        elif isinstance(value, str) and (value == "???" or "${" in value):
            del values[key]
    return {**values, **changes}


def option_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The folders config options are read from, in Hydra's order (the first that has an option wins): the shipped
    configs, then the user's (`--config-dir`). Inside a command, Hydra's search path says; else the shipped
    configs and `extra`."""
    if not HydraConfig.initialized():
        return [CONFIG_DIR, *map(Path, extra)]
    dirs = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema == "file":
            dirs.append(Path(source.path))
        elif source.schema == "pkg" and source.path == "trainer.configs":
            dirs.append(CONFIG_DIR)
    return dirs


def shadowed_options() -> list[str]:
    """`DIR/<group>/<name>.yaml` of each --config-dir folder that a shipped option of the same name hides (Hydra reads
    the shipped configs first): a user's `model/cnn.yaml` is never used, and nothing else would say so."""
    return [str(path) for folder in given_config_dirs() for path in sorted(folder.glob("*/*.yaml"))
            if (CONFIG_DIR / path.parent.name / path.name).is_file()]


def option_file(group: str, option: str, dirs: Sequence[Path]) -> Path:
    """`<dir>/<group>/<option>.yaml` of the first of `dirs` that has it (Hydra's rule)."""
    return next((d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()),
                CONFIG_DIR / group / f"{option}.yaml")


def options(group: str, dirs: Sequence[Path] = (CONFIG_DIR,)) -> tuple[str, ...]:
    """The option names of a config group: <dir>/<group>/<name>.yaml in each of `dirs`."""
    return tuple(sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")}))


def option_target(group: str, option: str, dirs: Sequence[Path]) -> str | None:
    """The `_target_` an option names (at its root, or, for a `# @package _global_` option such as a task's, in its
    node of the group's name)."""
    node = read_yaml(option_file(group, option, dirs)) or {}
    return node.get("_target_") or (node.get(group) or {}).get("_target_")
