"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only=True."""

from __future__ import annotations

import pickle
import re
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trainer.errors import UserError
from trainer.fsutil import atomic_write

FORMAT = "hydra-torch-trainer"
VERSION = 1
REQUIRED = ("model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config")
# Config keys that must be equal to resume: they change what the saved tensors mean.
MUST_MATCH = ("model", "dataset._target_", "dataset.val_size", "dataset.split_seed",
              "optimizer._target_", "scheduler._target_")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` so that a crash at any moment leaves the previous file intact."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no pickled code can run), or raise UserError saying why it can't be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        smuggled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if smuggled:
            raise UserError(f"refusing to load {path}: it holds a pickled {smuggled[1]} object, and only tensors "
                            "and plain values are loaded (weights_only=True); nothing in it was run") from None
        raise UserError(f"{path} is not a readable checkpoint (not a torch file)") from None
    except Exception as e:  # torn zip, random bytes, empty file...
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                        f"{type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this framework")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise UserError(f"{path} is missing {', '.join(missing)}")
    return state


def find_unfinished_run(output_root: Path, overrides: list[str], checkpoint_dir: str) -> Path | None:
    """`last.pt` of the newest unfinished run under `output_root` started with these command-line overrides.

    A run is unfinished when it has a checkpoint but no `metrics.json` (written after the final test).
    Overrides are compared as a set, ignoring `trainer.resume`, from each run's `.hydra/overrides.yaml`.
    """
    def key(items: list[str]) -> set[str]:
        return {o for o in items if not o.startswith("trainer.resume=")}

    want, found = key(overrides), []
    for saved in output_root.rglob(".hydra/overrides.yaml"):
        run = saved.parent.parent
        last = run / checkpoint_dir / "last.pt"
        if last.is_file() and not (run / "metrics.json").exists() and key(yaml.safe_load(saved.read_text()) or []) == want:
            found.append(last)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """Compare a checkpoint's config with the current one.

    Raises UserError naming the keys that make resuming meaningless (architecture, data split,
    optimizer or scheduler type); returns `key: old -> new` lines for the harmless differences.
    """
    old, new = flatten(yaml.safe_load(saved_yaml)), flatten(yaml.safe_load(current_yaml))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    fatal = [k for k in changed if any(k == m or k.startswith(m + ".") for m in MUST_MATCH)]
    if fatal:
        diffs = "; ".join(f"{k}: {old.get(k, '<unset>')!r} in the checkpoint, {new.get(k, '<unset>')!r} now"
                          for k in fatal)
        raise UserError(f"cannot resume: the checkpoint was trained with a different setup ({diffs})")
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed]


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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
