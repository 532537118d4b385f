"""The dataset cache: decoded tensors beside the data, checked on every load (see ImageDataset).

The cache lies in the user's data folder and may have come with it from elsewhere, so it is read as a file
from elsewhere is (trainer.run.untrusted): its zip records and tensor views are checked before anything is read,
and its content against its digest on every load. A kill during a write leaves a temporary file there, which
a later run removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from trainer.run.files import remove_stale_temps
from trainer.run.untrusted import load_torch_file
from trainer.system import host_memory_bytes

log = logging.getLogger(__name__)


def digest(record: dict[str, Any]) -> str:
    """The content digest of a dataset's class names, images and labels (its identity in checkpoints).
    SHA-256 runs at about 1.7 GB/s with the CPU's SHA instructions: 0.03 s for MNIST's 55 MB, measured."""
    h = hashlib.sha256(json.dumps(record["classes"]).encode())
    for key in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y"):
        if key in record:
            h.update(key.encode())
            h.update(memoryview(record[key].reshape(-1).numpy().view(np.uint8)))
    return h.hexdigest()[:16]


def load_cache(cache: Path, stamp: str) -> dict[str, Any] | None:
    """The cached record if `cache` holds one for files of this `stamp` whose content matches its digest, else None
    (the caller decodes again and rewrites it). The cache lies in the data folder and may have come with it from
    elsewhere: its zip records and tensor views are checked before anything is read, and its digest on every load,
    so a corrupted or crafted cache costs one warning and a rebuild, never a run trained on other bytes."""
    if not cache.is_file():
        return None
    try:
        # memory-mapped, never read whole: a cache larger than memory (data beyond dataset.memory_budget_gib) loads;
        # its records are stored uncompressed, so the file's own size bounds them
        record = load_torch_file(cache, max(host_memory_bytes(), cache.stat().st_size))
        if record["stamp"] != stamp:
            log.info("dataset files changed since %s was written: decoding again", cache)
            return None
        if digest(record) != record["digest"]:
            log.warning("dataset cache %s does not match its digest (its bytes changed after it was written): "
                        "decoding again", cache)
            return None
        return record
    except Exception as e:  # a stale or torn cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s: %s", cache, " ".join(str(e).split())[:200])
    return None


def remove_killed_writes(cache: Path, name: str) -> None:
    """Remove the temporary files, up to the cache's size each, that killed writes of `cache` left in the user's
    data folder: only those of its own name, and none that a live writer (another run decoding now) holds."""
    for stale in remove_stale_temps(cache.parent, re.escape(cache.name)):
        log.info("dataset %s: removed %s, left by a cache write that was killed", name, stale)
