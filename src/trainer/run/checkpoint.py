"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only=True."""

from __future__ import annotations

import logging
import math
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trainer.errors import UserError, is_number
from trainer.run.files import atomic_write
from trainer.run.untrusted import (
    MAX_CLASSES,
    check_tensors,
    file_kind,
    yaml_hazard,
    zip_members,
)

log = logging.getLogger(__name__)

FORMAT = "hydra-torch-trainer"
# 2: adds "choices", the config options the run was composed from (Hydra's runtime choices, e.g. model: cnn).
# A version-1 file is read as version 2 with choices None: they are then inferred from its `_target_`s.
# 3: adds "data", the dataset's identity (name, image shape, class names, normalisation, content digest). A file
# of an earlier version is read with data None: it was trained on MNIST or FashionMNIST, whose identity is known.
VERSION = 3
REQUIRED = ("model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config")
COUNTERS = ("epoch", "global_step", "batch_in_epoch")
# The config groups whose options are objects; a stored config may name each one's class at its root only.
GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "trainer", "task", "logger", "distributed")
# Groups that only change values (`# @package _global_` presets); a choice of one is stored too.
PRESET_GROUPS = ("experiment", "debug")
# Keys through which hydra.utils.instantiate reads code or call structure: _target_, _args_, _partial_,
# _recursive_, _convert_, and any it may add. Only a group's own root may hold _target_ and _partial_.
RESERVED = re.compile(r"^_\w+_$")
ROOT_KEYS = {"_target_": str, "_partial_": bool}
# Groups of which a run picks several options (`logger=[tensorboard,csv]`): each option is a node of its own,
# `logger.csv`, whose root may hold _target_ and _partial_ as a group's does.
LIST_GROUPS = ("logger", "callbacks", "metrics")
# Where shipped options' classes lived before the package was split into loop/, run/, report/ and cli/: a
# checkpoint written then names these, and is read as naming the same class in its new module.
MOVED_TARGETS = {"trainer.schedulers.": "trainer.loop.schedulers.", "trainer.losses.": "trainer.loop.losses.",
                 "trainer.logger.": "trainer.report.logger."}
MAX_CONFIG_CHARS = 1_000_000  # a resolved config is a few KiB


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` so that a crash at any moment leaves the previous file intact."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no pickled code can run), or raise UserError saying why it can't be used."""
    path = Path(path).expanduser()
    if path.is_dir():  # a run directory, most likely: name the file in it
        found = sorted(path.glob("checkpoints/*.pt"))
        raise UserError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file" +
                        (f"; it holds {', '.join(str(p) for p in found[:2])}" if found else ""))
    if not path.is_file():
        if path.exists():  # a FIFO would make torch.load wait for a writer forever
            raise UserError(f"checkpoint {str(path)!r} is {file_kind(path.stat().st_mode)}, not a regular file")
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    zip_members(path, path.stat().st_size, stored_only=True, what="checkpoint")  # before torch.load reads anything
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        smuggled = pickled_global(e)
        if smuggled:
            raise UserError(f"refusing to load {path}: it holds a pickled {smuggled} object, and only tensors "
                            "and plain values are loaded (weights_only=True); nothing in it was run") from None
        raise UserError(f"{path} is not a readable checkpoint (not a torch file)") from None
    except Exception as e:  # torn zip, random bytes, empty file...
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                        f"{type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this framework")
    check_tensors(state, str(path))  # before any tensor in it is copied: a zero-stride view may stand for billions
    version = state.get("version")
    if not _is_int(version) or version < 1:
        raise UserError(f"{path}: checkpoint version {version!r} is not one this framework writes (1 to {VERSION})")
    if version > VERSION:
        raise UserError(f"{path} was written by a newer version of this framework (checkpoint version {version}; "
                        f"this code reads 1 to {VERSION}); update the code to use it")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise UserError(f"{path} is missing {', '.join(missing)}")
    bad = next((k for k in COUNTERS if k in state and not (_is_int(state[k]) and state[k] >= 0)), None)
    if bad:
        raise UserError(f"{path}: {bad}={state[bad]!r} is not a count (an integer >= 0)")
    state.setdefault("batch_in_epoch", 0)
    state["config"] = plain_config(state["config"], path)
    state["choices"] = _stored_choices(state.get("choices"), path)
    state["data"] = _stored_data(state.get("data"), path)
    state["class_weights"] = _stored_class_weights(state.get("class_weights"), state["data"], path)
    return state


def _stored_class_weights(weights: object, data: dict | None, path: Path) -> list[float] | None:
    """loss.class_weights as the run resolved them (None: none, or written before them), checked."""
    if weights is None:
        return None
    if not (isinstance(weights, list) and all(is_number(w) and math.isfinite(w) and w >= 0 for w in weights)):
        raise UserError(f"refusing {path}: its stored class_weights are not a list of numbers >= 0")
    if data is not None and len(weights) != len(data["classes"]):
        raise UserError(f"refusing {path}: it stores {len(weights)} class weights for {len(data['classes'])} classes")
    return weights


def _stored_data(data: object, path: Path) -> dict[str, Any] | None:
    """The dataset identity a checkpoint records (see ImageDataset.identity), checked to be plain values."""
    if data is None:
        return None

    def numbers(v: object, n: int | None = None) -> bool:
        return isinstance(v, list) and (n is None or len(v) == n) and all(is_number(x) for x in v)

    ok = (isinstance(data, dict) and isinstance(data.get("name"), str) and numbers(data.get("in_shape"), 3)
          and all(isinstance(x, int) and x > 0 for x in data["in_shape"]) and isinstance(data.get("classes"), list)
          and 0 < len(data["classes"]) and all(isinstance(c, str) for c in data["classes"])
          and numbers(data.get("mean"), data["in_shape"][0]) and numbers(data.get("std"), data["in_shape"][0])
          and all(s > 0 for s in data["std"]) and isinstance(data.get("digest"), (str, type(None))))
    if not ok:
        raise UserError(f"refusing {path}: its stored dataset identity is not a name, an image shape, class names "
                        "and a normalisation")
    fold = data.get("fold")  # [fold, folds, split_seed] of a k-fold run (ImageDataset.identity)
    if fold is not None and not (isinstance(fold, list) and len(fold) == 3 and all(_is_int(v) for v in fold)
                                 and 0 <= fold[0] < fold[1]):
        raise UserError(f"refusing {path}: its stored fold is not [fold, folds, split_seed] with 0 <= fold < folds")
    if len(data["classes"]) > MAX_CLASSES:  # the model's head, every table and picture of classes are this wide
        raise UserError(f"refusing {path}: it stores {len(data['classes'])} class names; at most {MAX_CLASSES} "
                        "classes are read")
    return data


def pickled_global(error: BaseException) -> str | None:
    """The class or function a file refused by `torch.load(weights_only=True)` tried to load, if it names one."""
    # torch < 2.14: "Unsupported global: GLOBAL x.y"; 2.14 for blocked modules: "unsupported GLOBAL x.y whose ..."
    found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
    return found[1] if found else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"refusing {path}: its stored config {what}; a checkpoint may hold only plain values "
                     "(numbers, strings, bools and lists of them), never code to run")


def plain_config(text: object, path: Path) -> dict[str, Any]:
    """The config stored in a checkpoint, parsed as plain YAML and checked to name no code to run.

    Every checkpoint consumer (resume, eval, predict, export, the final test) reads configs through
    `load_checkpoint`, hence through this. A reserved key (`_target_`, `_args_`, `_partial_`, ...) is
    refused anywhere except a group's own `_target_` (a string) and `_partial_` (a bool); those are
    only ever compared with the project's own options (`trainer.cli.config.rebuildable_config`), never used
    as they are unless the user passes trust_checkpoint.
    """
    if not isinstance(text, str):
        raise _refuse(path, f"is a {type(text).__name__}, not YAML text")
    if len(text) > MAX_CONFIG_CHARS:
        raise _refuse(path, f"is {len(text)} characters long (at most {MAX_CONFIG_CHARS})")
    try:
        hazard = yaml_hazard(text)  # before anything is built: an alias or deep nesting makes a small text costly
        if hazard:
            raise _refuse(path, hazard)
        config = yaml.safe_load(text)  # plain types only: no tags, no objects
    except yaml.YAMLError as e:
        raise _refuse(path, f"is not valid YAML ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(config, dict):
        raise _refuse(path, "is not a mapping of config keys")
    if isinstance(config.get("logger"), dict) and "_target_" in config["logger"]:
        config["logger"] = {"tensorboard": config["logger"]}  # written when a run had one tracker
    _check_plain(config, "", path)
    options = [config.get(group) for group in GROUPS if group not in LIST_GROUPS]
    options += [node for group in LIST_GROUPS if isinstance(config.get(group), dict) for node in config[group].values()]
    for node in options:
        target = node.get("_target_") if isinstance(node, dict) else None
        for old, new in MOVED_TARGETS.items():
            if isinstance(target, str) and target.startswith(old):
                node["_target_"] = new + target.removeprefix(old)
    if isinstance(config.get("trainer"), dict) and config["trainer"].get("_target_") == "trainer.Trainer":
        del config["trainer"]["_target_"]  # the settings of the Trainer, which train.py now builds from them
    return config


def _check_plain(value: object, key: str, path: Path) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{key}.{k}" if key else str(k)
            if not isinstance(k, str):
                raise _refuse(path, f"has a non-string key {name!r}")
            if RESERVED.match(k):
                root = key in GROUPS or (key.partition(".")[0] in LIST_GROUPS and key.count(".") == 1)
                if root and k in ROOT_KEYS and isinstance(v, ROOT_KEYS[k]):
                    continue  # the group's own class, checked against the project's options before any use
                raise _refuse(path, f"has the key {name}")
            _check_plain(v, name, path)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict):
                raise _refuse(path, f"has a mapping inside the list {key}[{i}]")
            _check_plain(v, f"{key}[{i}]", path)
    elif isinstance(value, str) and "${" in value:
        # An interpolation is resolved when the config is used: ${oc.create:...} makes a node with a _target_,
        # ${oc.env:...} reads the environment. A config is stored resolved, so a real one has none.
        raise _refuse(path, f"value {key} is an interpolation (${{...}})")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise _refuse(path, f"value {key} is a {type(value).__name__}")


def _stored_choices(choices: object, path: Path) -> dict[str, str | None] | None:
    """The option names the run was composed from ({group: option}), or None for a version-1 file."""
    if choices is None:
        return None
    groups = GROUPS + PRESET_GROUPS
    if not (isinstance(choices, dict) and all(k in groups and (v is None or isinstance(v, str))
                                              for k, v in choices.items())):
        raise UserError(f"refusing {path}: its stored choices {choices!r} are not option names of the groups "
                        f"{', '.join(groups)}")
    return choices


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], where: Path | str = "the checkpoint") -> None:
    """Restore the RNGs from `rng_state()`'s dict, refused in one line unless it has exactly that form."""
    _check_rng_state(state, where)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _check_rng_state(state: object, where: Path | str) -> None:
    """Raise UserError unless `state` has the keys, types, shapes and dtypes `rng_state()` writes: each is copied
    into a generator, so a tensor of another size would be materialised (and its shape is this code's, not the
    file's, to choose)."""
    def byte_state(t: object, n: int | None) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and (n is None or t.numel() == n)

    ok = isinstance(state, dict) and set(state) == {"torch", "cuda", "numpy", "python"}
    ok = ok and byte_state(state["torch"], torch.get_rng_state().numel())
    # a CUDA generator's state is a seed and an offset (16 bytes): 64 is room for another layout, not for a bomb
    ok = ok and isinstance(state["cuda"], list) and len(state["cuda"]) <= 1024 and all(
        byte_state(t, None) and t.numel() <= 64 for t in state["cuda"])
    n = state["numpy"] if ok else None
    ok = ok and isinstance(n, dict) and set(n) == {"kind", "keys", "pos", "has_gauss", "cached_gaussian"} and (
        n["kind"] == "MT19937" and isinstance(n["keys"], torch.Tensor) and n["keys"].dtype == torch.int64
        and tuple(n["keys"].shape) == (624,) and _is_int(n["pos"]) and 0 <= n["pos"] <= 624
        and _is_int(n["has_gauss"]) and is_number(n["cached_gaussian"]))
    py = state["python"] if ok else None
    ok = ok and isinstance(py, (tuple, list)) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], (tuple, list))
    ok = ok and len(py[1]) == 625 and all(map(_is_int, py[1])) and (py[2] is None or is_number(py[2]))
    if not ok:
        raise UserError(f"refusing {where}: its stored random-number states (rng) are not the generators' states "
                        "this code writes (their keys, types, shapes or dtypes differ)")
