"""What differs between the run a checkpoint holds and this one: config keys, and the data trained on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError

log = logging.getLogger(__name__)


# Config keys that must be equal to resume: they change what the saved tensors mean.
MUST_MATCH = ("model", "dataset._target_", "dataset.val_size", "dataset.split_seed", "dataset.folds", "dataset.fold",
              "optimizer._target_", "scheduler._target_")


# ... and, for a checkpoint written mid-epoch, the keys that say which samples the epoch's remaining batches hold.
MUST_MATCH_MID_EPOCH = ("dataset.batch_size", "trainer.limit_train_batches", "trainer.accumulate_grad_batches",
                        "dataset.sampler")

# The classes options named before they were replaced (the same loss, with class_weights since): a checkpoint
# that names one is rebuilt with its option's class today (trainer.cli.config), and resumes as if it named it.
FORMER_TARGETS = {"torch.nn.CrossEntropyLoss": "trainer.loop.losses.CrossEntropy",
                  "torch.nn.MultiMarginLoss": "trainer.loop.losses.MultiMargin"}

# Keys added since a checkpoint may have been written, with the value that means what it did before them.
ADDED_KEYS = {"dataset.sampler": "shuffle", "dataset.folds": None, "dataset.fold": 0}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


NOT_CHANGES = {"trainer.resume"}  # differs in every resume: the checkpoint being resumed is named there


def config_changes(saved: dict, current_yaml: str, mid_epoch: bool = False) -> list[str]:
    """Compare a checkpoint's config (as `load_checkpoint` returns it) with the current one.

    Raises UserError naming the keys that make resuming meaningless (architecture, data split,
    optimizer or scheduler type; for a checkpoint written `mid_epoch`, also the batching); returns
    `key: old -> new` lines for the harmless differences.
    """
    current = yaml.safe_load(current_yaml)
    old, new = (_as_today(flatten(c), c) for c in (saved, current))
    changed = sorted(k for k in (old.keys() | new.keys()) - NOT_CHANGES
                     if old.get(k, "<unset>") != new.get(k, "<unset>"))

    def diffs(keys: list[str]) -> str:
        return "; ".join(f"{k}: {old.get(k, '<unset>')!r} in the checkpoint, {new.get(k, '<unset>')!r} now"
                         for k in keys)

    fatal = [k for k in changed if any(k == m or k.startswith(m + ".") for m in MUST_MATCH)]
    if fatal:
        raise UserError(f"cannot resume: the checkpoint was trained with a different setup ({diffs(fatal)})")
    batching = [k for k in changed if k in MUST_MATCH_MID_EPOCH] if mid_epoch else []
    if batching:
        raise UserError(f"cannot resume: the checkpoint was written mid-epoch and its epoch's remaining batches "
                        f"depend on the batching ({diffs(batching)}); resume it as it was, or resume an epoch-end "
                        "checkpoint (best.pt, or last.pt after an epoch) with the new batching")
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed]


def _as_today(flat: dict[str, Any], config: dict) -> dict[str, Any]:
    """A flattened config with the keys added since it was written (at the values that mean what it meant) and the
    classes named today where it names their former ones."""
    added = {k: v for k, v in ADDED_KEYS.items() if k.split(".")[0] in config}
    return {**added, **{k: FORMER_TARGETS.get(v, v) if k.endswith("._target_") and isinstance(v, str) else v
                        for k, v in flat.items()}}


def require_same_data(saved: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """Raise UserError unless the data a checkpoint was trained on is the data of this run (same images, labels,
    classes and shape; a file from before version 3, which records none, was checked by its config alone)."""
    if saved is None:
        return
    for key in ("in_shape", "classes", "digest"):
        if saved[key] != current[key] and saved[key] is not None:
            what = {"in_shape": "image shape", "classes": "class names", "digest": "images or labels"}[key]
            raise UserError(f"cannot resume {path}: it was trained on other data ({what} differ: {saved['name']} "
                            f"{_short(saved[key])} in the checkpoint, {current['name']} {_short(current[key])} now)")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
