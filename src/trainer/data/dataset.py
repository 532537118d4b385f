"""`ImageDataset`: any image-classification source, materialised once into uint8 tensors and served fast.

A source (a subclass) only says how to read its images: `read()` returns an `Images`. The base class
does the rest for every source alike: the cache (decoded tensors next to the data, memory-mapped on
later runs), the seeded validation and test splits, per-channel normalisation (`auto`: computed on the
training images and cached), where the tensors live (the training device when they fit, else host
memory copied per batch), sharding for several processes, and the identity a checkpoint records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.data.batches import (
    BatchLoader,
    BatchTransform,
    StreamingLoader,
    check_augmentation,
    check_augmentation_fits,
)
from trainer.data.cache import digest, load_cache, remove_killed_writes
from trainer.data.splits import SAMPLERS, Folds, balanced_weights, class_counts, split_indices, split_size
from trainer.errors import OutputError, UserError, is_number, require_bool, require_int, shown
from trainer.run.files import atomic_write, require_free_space, scratch_file
from trainer.system import device_free_bytes, host_memory_bytes, size_text

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached record changes meaning
BLOCK_BYTES = 4 * 2**20  # data beyond the memory budget is read in runs of neighbouring images of about this size


@dataclass
class Images:
    """What a source returns: uint8 images, int64 labels in [0, len(classes)), and the class names.

    Images are (N, C, H, W) or (N, H, W) (grey), C = 1 or 3, as tensors or NumPy arrays. `test_*` and
    `val_*` are the source's own test and validation splits, if it has them; otherwise the dataset holds
    `test_size` and `val_size` images out of train, by `split_seed`.
    """

    train_x: Any
    train_y: Any
    classes: Sequence[str]
    test_x: Any = None
    test_y: Any = None
    val_x: Any = None
    val_y: Any = None


def as_images(array: Any, where: str) -> torch.Tensor:
    """A uint8 (N, C, H, W) tensor from (N, H, W), (N, C, H, W) or (N, H, W, C) uint8 data; C must be 1 or 3."""
    x = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if x.dtype != torch.uint8:
        raise UserError(f"{where}: images are {str(x.dtype).removeprefix('torch.')}, must be uint8 (0-255)")
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if x.ndim != 4:
        raise UserError(f"{where}: images have shape {tuple(x.shape)}; use (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if x.shape[1] not in (1, 3):
        raise UserError(f"{where}: images have {x.shape[1]} channels {tuple(x.shape)}; 1 (grey) or 3 (RGB) are "
                        "supported (drop an alpha channel first: x[..., :3])")
    return x.contiguous()


def as_labels(array: Any, count: int, num_classes: int, where: str) -> torch.Tensor:
    """An int64 (N,) tensor of class indices, checked against the image count and the class count."""
    y = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.ndim != 1:
        raise UserError(f"{where}: labels must be a 1-d array of integer class indices, not "
                        f"{str(y.dtype).removeprefix('torch.')} {tuple(y.shape)}")
    if len(y) != count:
        raise UserError(f"{where}: {count} images but {len(y)} labels")
    y = y.to(torch.int64)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UserError(f"{where}: label {bad} is out of range for {num_classes} classes (0 to {num_classes - 1})")
    return y.contiguous()


TARGETS = ("class", "multi_hot", "values")  # what a task reads as targets (trainer.tasks.Task.targets)


def as_targets(array: Any, count: int, width: int, kind: str, where: str) -> torch.Tensor:
    """Float32 (N, width) targets: `multi_hot` 0/1 per label (a multi-label task), `values` finite numbers (a
    regression; (N,) is one column), checked against the image count and the label or column count."""
    y = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if y.dtype.is_complex or y.dtype == torch.bool and kind == "values" or y.ndim not in (1, 2):
        raise UserError(f"{where}: targets must be a (N,) or (N, {width}) array of numbers, not "
                        f"{str(y.dtype).removeprefix('torch.')} {tuple(y.shape)}")
    if y.ndim == 1:
        y = y[:, None]  # (N,) -> (N, 1)
    if len(y) != count:
        raise UserError(f"{where}: {count} images but {len(y)} targets")
    if y.shape[1] != width:
        what = ("label" if kind == "multi_hot" else "column") + "s" * (y.shape[1] != 1)
        raise UserError(f"{where}: targets have {y.shape[1]} {what} per image, but the names (classes) give {width}")
    y = y.to(torch.float32)
    if kind == "multi_hot":
        bad = y[(y != 0) & (y != 1)]
        if bad.numel():
            raise UserError(f"{where}: multi-hot targets hold {float(bad[0]):g}; each label is 0 (absent) or 1 "
                            "(present)")
    elif y.numel() and not bool(torch.isfinite(y).all()):
        raise UserError(f"{where}: targets hold {float(y[~torch.isfinite(y)][0])}; every target must be a finite "
                        "number")
    return y.contiguous()


class ImageDataset:
    """Base class of every dataset option, and of a user's own dataset class.

    A subclass implements `read()` and, to be cached, `sources()`. It may set `name` and override
    `prepare()` (download or provision files before `sources()` is asked) and `cache_options()`
    (its own settings that change what `read()` returns). Exposes `train`, `val` and `test`
    BatchLoaders, `in_shape` (C, H, W), `classes`, `num_classes`, `mean`, `std` and `identity()`.
    """

    name: str = ""  # shown in logs and stored in checkpoints; default: the class name
    # The targets `read()` can give (trainer.tasks.Task.targets): class indices only, unless a source says more
    # (a tensors file and an image folder with a labels CSV give every kind; a class of yours may too).
    target_kinds: tuple[str, ...] = ("class",)

    # One keyword per key of configs/dataset_base/common.yaml, which every dataset option extends (docs/data.md).
    def __init__(self, *, batch_size: int, eval_batch_size: int, val_size: int | float, test_size: int | float,  # noqa: PLR0913
                 split_seed: int, mean: str | float | list[float], std: str | float | list[float],
                 augment_shift: int, augment_rotate: float, augment_cutout: int, random_crop: int, hflip: bool,
                 shuffle: bool, drop_last: bool, cache: bool,
                 device_margin_gib: float, sampler: str = "shuffle", folds: int | None = None, fold: int = 0,
                 memory_budget_gib: float | None = None,
                 device: torch.device | str = "cpu", seed: int = 0, targets: str = "class") -> None:
        _check_common(batch_size=batch_size, eval_batch_size=eval_batch_size, val_size=val_size, test_size=test_size,
                      augment=(augment_shift, augment_rotate, augment_cutout, random_crop),
                      switches={"hflip": hflip, "shuffle": shuffle, "drop_last": drop_last, "cache": cache},
                      device_margin_gib=device_margin_gib, sampler=sampler, targets=targets)
        self.folds = Folds.of(folds, fold)
        self.sampler = sampler
        if memory_budget_gib is not None and not (is_number(memory_budget_gib) and memory_budget_gib > 0):
            raise UserError(f"dataset.memory_budget_gib={shown(memory_budget_gib)}: must be a number > 0 (GiB), or "
                            "null (half this machine's memory)")
        # decoded images above this are not held in memory: they are read from the memory-mapped cache on disk
        self.memory_budget = int(memory_budget_gib * 2**30) if memory_budget_gib else host_memory_bytes() // 2
        self.memory_budget_gib = memory_budget_gib
        self._stamp = ""
        self.name = self.name or type(self).__name__
        if targets not in self.target_kinds:
            task, what = {"multi_hot": ("multilabel", "0/1 labels"), "values": ("regression", "numbers")}[targets]
            raise UserError(f"dataset {self.name} gives class labels only, and task={task} learns {what}: use "
                            "dataset=tensors (a .npz or .pt file of them) or dataset=image_folder with dataset.labels="
                            "FILE.csv (docs/tasks.md)")
        self.targets = targets  # what `read()` returns as labels: the task's (trainer.tasks)
        self.cache = cache
        self.cache_file: Path | None = None  # where the decoded tensors are cached, if they are
        self._scratch: list[tuple[Path, int]] = []  # files a decode beyond the memory budget wrote into, removed
        # once the cache is written
        self._unsaved: dict[str, Any] | None = None
        try:
            self._build(mean, std, (augment_shift, augment_rotate, augment_cutout, random_crop, hflip), (
                val_size, test_size, split_seed), torch.device(device), batch_size=batch_size,
                eval_batch_size=eval_batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                device_margin_gib=device_margin_gib)
        finally:  # refused or failed, the scratch files of a decode beyond memory go too
            self._drop_scratch()

    def _build(self, mean: Any, std: Any, augment: tuple, split: tuple, device: torch.device, *,  # noqa: PLR0913
               batch_size: int, eval_batch_size: int, shuffle: bool, seed: int, drop_last: bool,
               device_margin_gib: float) -> None:
        """Read (or load the cache), normalise, split and serve: what __init__ does once its options are checked."""
        augment_shift, augment_rotate, augment_cutout, random_crop, hflip = augment
        val_size, test_size, split_seed = split
        record = self._materialised()
        train_x = record["train_x"]
        self.in_shape: tuple[int, int, int] = tuple(train_x.shape[1:])
        self.classes: tuple[str, ...] = tuple(record["classes"])
        self.num_classes = len(self.classes)
        self.digest: str = record["digest"]
        channels = self.in_shape[0]
        self.mean = _per_channel("mean", record["mean"] if mean == "auto" else mean, channels)
        self.std = _per_channel("std", record["std"] if std == "auto" else std, channels)
        check_augmentation_fits(self.in_shape, augment_shift, augment_cutout, random_crop)
        train_tf = BatchTransform(self.mean, self.std, augment_shift, random_crop, hflip, augment_rotate,
                                  augment_cutout)
        eval_tf = BatchTransform(self.mean, self.std)

        test_x, test_y, val_x, val_y = (record.get(k) for k in ("test_x", "test_y", "val_x", "val_y"))
        if self.folds is not None and val_x is not None:
            raise UserError(f"dataset.folds={self.folds.folds}: dataset {self.name} has a validation split of its own "
                            "(a val/ folder, val_x); k-fold splits the training images into train and validation, so "
                            "move those images into train")
        train_idx, val_idx, test_idx = split_indices(
            record["train_y"], hold_test=test_x is None, hold_val=val_x is None, val_size=val_size,
            test_size=test_size, split_seed=split_seed, folds=self.folds)
        self.split_seed = split_seed
        self.train_targets = record["train_y"][train_idx]
        # per class (per label for multi-hot targets) in the training split: class weights and the balanced sampler
        self.class_counts = class_counts(self.train_targets, self.num_classes)

        self._serve(record, (train_idx, val_idx, test_idx), device, batch_size=batch_size,
                    eval_batch_size=eval_batch_size, transforms=(train_tf, eval_tf), shuffle=shuffle, seed=seed,
                    drop_last=drop_last, device_margin_gib=device_margin_gib)
        self._save_cache()

    def _serve(self, record: dict[str, Any], splits: tuple[torch.Tensor, ...], device: torch.device, *,  # noqa: PLR0913
               batch_size: int, eval_batch_size: int, transforms: tuple[BatchTransform, BatchTransform], shuffle: bool,
               seed: int, drop_last: bool, device_margin_gib: float) -> None:
        """The loaders `train`, `train_eval`, `val` and `test` over the record's tensors: on the device or in host
        memory when they fit the memory budget, else read from the memory-mapped cache window by window."""
        train_idx, val_idx, test_idx = splits
        train_tf, eval_tf = transforms
        nbytes = sum(record[k].numel() for k in ("train_x", "test_x", "val_x") if k in record)
        self.streaming = nbytes > self.memory_budget
        stream: dict[str, int] = {}
        if self.streaming:
            record, stream = self._streamed(record, nbytes, batch_size)
            train_idx, val_idx, test_idx = (i.sort().values for i in splits)  # stored order: local reads
            home = torch.device("cpu")
        else:
            self.require_memory(nbytes)
            home = self._home(device, nbytes, device_margin_gib)  # where the tensors live; batches go to `device`

        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(home)

        # train, val and (held-out) test index into one copy of the training images: no copy per split.
        train_x, train_y = put(record["train_x"]), put(record["train_y"])
        test_x, test_y, val_x, val_y = (put(record.get(k)) for k in ("test_x", "test_y", "val_x", "val_y"))
        if not drop_last and len(train_idx) % batch_size == 1 and len(train_idx) > 1:
            # BatchNorm cannot train on one image (torch raises); a small folder hits this by chance
            log.info("dataset %s: %d training images leave a last batch of one image, which BatchNorm cannot "
                     "train on; it is dropped each epoch (a different image each time when shuffled)", self.name,
                     len(train_idx))
            drop_last = True
        weights = balanced_weights(self.train_targets, self.num_classes) if self.sampler == "balanced" else None
        loader = functools.partial(StreamingLoader, **stream) if stream else BatchLoader
        self.train = loader(train_x, train_y, batch_size, transform=train_tf, shuffle=shuffle, seed=seed,
                            drop_last=drop_last, indices=put(train_idx), device=device, weights=weights)
        # the training split as evaluation reads it (an embedding's nearest-neighbour reference): views of the
        # same tensors
        evaluation = functools.partial(BatchLoader, batch_size=eval_batch_size, transform=eval_tf, shuffle=False,
                                       device=device)
        self.train_eval = evaluation(train_x, train_y, indices=put(train_idx))
        self.val = evaluation(val_x, val_y) if val_x is not None else evaluation(train_x, train_y,
                                                                                 indices=put(val_idx))
        self.test = evaluation(test_x, test_y) if test_x is not None else evaluation(train_x, train_y,
                                                                                    indices=put(test_idx))

    def _streamed(self, record: dict[str, Any], nbytes: int, batch_size: int) -> tuple[dict[str, Any], dict]:
        """The record memory-mapped from the cache (written first if this run decoded it), and the streaming
        loader's block and window sizes, for images (`nbytes` in all) over the memory budget."""
        budget = size_text(self.memory_budget)
        if self.cache_file is None:
            how = "set dataset.cache=true" if not self.cache else f"give {type(self).__name__} sources() to cache"
            raise UserError(f"dataset {self.name}: its images take {size_text(nbytes)}, more than "
                            f"dataset.memory_budget_gib ({budget}); training beyond memory reads them from the "
                            f"cache on disk: {how}")
        if self.sampler == "balanced":
            raise UserError(f"dataset.sampler=balanced draws images from anywhere in the data, and dataset {self.name} "
                            f"({size_text(nbytes)}) is over dataset.memory_budget_gib ({budget}), where training reads "
                            "it window by window; use loss.class_weights=auto instead, or raise the budget")
        sample = record["train_x"][0].numel()  # bytes per image
        window = self.memory_budget // 4  # the rest: the page cache, the model, the batches
        batch = min(batch_size, len(record["train_y"]))
        if batch * sample > window:
            given = (f"dataset.memory_budget_gib={self.memory_budget_gib}" if self.memory_budget_gib else
                     f"dataset.memory_budget_gib=null (half this machine's {size_text(host_memory_bytes())} of "
                     "memory)")
            raise UserError(f"{given}: a window of a quarter of it ({size_text(window)}) is smaller than one batch "
                            f"of {batch} images ({size_text(batch * sample)}); raise it or lower dataset.batch_size")
        if self._unsaved is None:  # loaded from the cache: memory-mapped and checked already
            mapped = record
        else:  # decoded by this run: written, then mapped from the file (the decoded copy goes)
            self._save_cache()
            mapped = load_cache(self.cache_file, self._stamp)
        if mapped is None:
            raise UserError(f"dataset {self.name}: its cache {self.cache_file} could not be written or read back, "
                            "and its images take more than dataset.memory_budget_gib; see the warning above")
        block = max(1, min(BLOCK_BYTES, window // 16) // sample)  # at least 16 blocks a window
        log.info("dataset %s: its images (%s) are over dataset.memory_budget_gib (%s): training reads them from "
                 "%s in windows of %s (blocks of %d neighbouring images, shuffled, then shuffled within the window)",
                 self.name, size_text(nbytes), budget, self.cache_file, size_text(window), block)
        return mapped, {"block": block, "window_blocks": max(1, window // (block * sample))}

    # --- what a source implements -----------------------------------------------------------------------

    def read(self) -> Images:
        """Read the source: uint8 images, labels and class names (see `Images`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement read()")

    def sources(self) -> list[Path]:
        """The files `read()` reads. Their names, sizes and modification times key the cache, which lives next
        to the first one. An empty list (the default) means: not cached, `read()` runs every time."""
        return []

    def prepare(self) -> None:
        """Make the files of `sources()` exist (download, provision). Runs before every load."""

    def cache_options(self) -> dict[str, Any]:
        """This source's settings that change what `read()` returns (an image size, a channel count)."""
        return {}

    def cache_dir(self, files: list[Path]) -> Path:
        """Where the cache is kept: the folder holding all of `files`."""
        return Path(os.path.commonpath(files)) if len(files) > 1 else Path(files[0]).parent

    def stamp(self, files: list[Path]) -> str:
        """A digest of the files' names, sizes and modification times: it changes when any file does."""
        return _stamp(files)

    # --- what every source gets -------------------------------------------------------------------------

    def shard(self, rank: int, world_size: int) -> None:
        """Give this process (`rank` of `world_size`) its disjoint part of every split (see BatchLoader.shard)."""
        for loader in (self.train, self.val, self.test, self.train_eval):
            loader.shard(rank, world_size)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records about the data: enough to rebuild a model for it, to refuse resuming on other
        data, and to classify new images (shape, class names, normalisation) without reading the dataset."""
        identity = {"name": self.name, "in_shape": list(self.in_shape), "classes": list(self.classes),
                    "mean": list(self.mean), "std": list(self.std), "digest": self.digest}
        if self.folds is not None:  # which images validated: eval refuses another fold's validation split
            identity["fold"] = [self.folds.fold, self.folds.folds, self.split_seed]
        return identity

    def decode_target(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Where a source may decode uint8 images of `shape` (N, C, H, W) beyond the memory budget: an array mapped
        onto a scratch file beside the cache (removed once the cache is written; a killed run's is removed by a
        later one), so decoding never holds them all in memory. None when they fit the budget (decode into memory,
        after require_memory) or nothing is cached."""
        nbytes = math.prod(shape)
        if nbytes <= self.memory_budget or self.cache_file is None:
            return None
        require_free_space(self.cache_file.parent, 2 * nbytes, f"dataset {self.name}: its images, decoded beyond "
                           "memory (a scratch file, then the cache)")
        path, fd = scratch_file(self.cache_file)
        self._scratch.append((path, fd))
        log.info("dataset %s: its images (%s) are over dataset.memory_budget_gib (%s): decoding them into %s, "
                 "then the cache", self.name, size_text(nbytes), size_text(self.memory_budget), path)
        return np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)

    def require_memory(self, nbytes: int, what: str = "its images",
                       hint: str = "use a smaller dataset.image_size or a subset of the data") -> None:
        """Raise UserError if `nbytes` (of `what`) cannot be held in this machine's memory; `hint`: what to do."""
        ram = host_memory_bytes()
        if nbytes > ram:
            raise UserError(f"dataset {self.name}: {what} take {size_text(nbytes)}, more than this machine's "
                            f"{size_text(ram)} of memory; {hint}")

    def _home(self, device: torch.device, nbytes: int, margin_gib: float) -> torch.device:
        """The training device when the images fit on it with `margin_gib` to spare, else host memory."""
        if device.type != "cuda":
            return device
        free = device_free_bytes(device)
        if nbytes + margin_gib * 2**30 <= free:
            return device
        log.info("dataset %s: its images (%s) do not fit in %s's free %s with the %.1f GiB margin "
                 "(dataset.device_margin_gib); keeping them in host memory and copying each batch", self.name,
                 size_text(nbytes), device, size_text(free), margin_gib)
        return torch.device("cpu")

    def _materialised(self) -> dict[str, Any]:
        """The source's tensors, statistics and digest: from the cache when it matches the files, else read."""
        self.prepare()
        files = self.sources()
        cache = stamp = self.cache_file = None
        if self.cache and files:
            options = {"source": type(self).__qualname__, "format": CACHE_FORMAT, **self.cache_options(),
                       **({"targets": self.targets} if self.targets != "class" else {})}  # class: as before tasks
            key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]
            cache = self.cache_file = self.cache_dir(files) / f"{self.name}-{key}.cache.pt"
            stamp = self._stamp = self.stamp(files)
            remove_killed_writes(cache, self.name)
            record = load_cache(cache, stamp)
            if record is not None:
                return record
        record = _record(self.read(), self.name, self.targets)
        if cache is not None:
            self._unsaved = {"stamp": stamp, **record}  # written once every option has been checked against it
        return record

    def _drop_scratch(self) -> None:
        for path, fd in self._scratch:  # a mapping of it lives on until its arrays go; the name goes now
            path.unlink(missing_ok=True)
            os.close(fd)
        self._scratch.clear()

    def _save_cache(self) -> None:
        try:
            self._write_cache()
        finally:
            self._drop_scratch()

    def _write_cache(self) -> None:
        if self._unsaved is None or self.cache_file is None:
            return
        try:
            with atomic_write(self.cache_file) as f:
                torch.save(self._unsaved, f)
            log.info("dataset %s: decoded tensors cached in %s", self.name, self.cache_file)
        except OutputError as e:  # the cache only saves the next run the decoding
            log.warning("dataset %s: decoded tensors not cached: %s", self.name, e)
        self._unsaved = None


def _check_common(*, batch_size: int, eval_batch_size: int, val_size: Any, test_size: Any, augment: tuple,
                  switches: dict[str, Any], device_margin_gib: Any, sampler: Any, targets: str) -> None:
    """The type and range checks of the keys every dataset takes, before anything is read."""
    require_int("dataset.batch_size", batch_size, 1)
    require_int("dataset.eval_batch_size", eval_batch_size, 1)
    for key, value in switches.items():
        require_bool(f"dataset.{key}", value)
    check_augmentation(*augment)
    for key, value in (("val_size", val_size), ("test_size", test_size)):
        split_size(key, value, 1)  # the type check; the count is checked once the data is known
    if not isinstance(device_margin_gib, (int, float)) or device_margin_gib < 0:
        raise UserError(f"dataset.device_margin_gib={device_margin_gib!r}: must be a number >= 0")
    if targets not in TARGETS:
        raise UserError(f"targets={targets!r}: one of {', '.join(TARGETS)}")
    if sampler not in SAMPLERS:
        raise UserError(f"dataset.sampler={shown(sampler)}: must be one of {', '.join(SAMPLERS)}")
    if sampler == "balanced" and not switches["shuffle"]:
        raise UserError("dataset.sampler=balanced draws a new seeded sample every epoch; it needs dataset.shuffle=true")
    if sampler == "balanced" and targets != "class":
        raise UserError(f"dataset.sampler=balanced balances classes; the task's targets are {targets}, not class "
                        "indices: use dataset.sampler=shuffle")


def _per_channel(key: str, value: Any, channels: int) -> list[float]:
    """`dataset.mean`/`std` as one value per channel: a number, or a list of 1 or `channels` numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = values and all(is_number(v) for v in values)
    if not ok or len(values) not in (1, channels):
        raise UserError(f"dataset.{key}={value!r}: must be auto, a number, or a list of one number per channel "
                        f"({channels} for these images)")
    if key == "std" and min(values) <= 0:
        raise UserError(f"dataset.std={value!r}: must be > 0")
    return [float(v) for v in values] * (channels if len(values) == 1 else 1)


def _stamp(files: list[Path]) -> str:
    """A digest of the files' names, sizes and modification times: it changes when any file does. Names as the
    cache's key has them (resolved), so one file given as `data/x.npz` and as its absolute path is one cache."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _record(images: Images, name: str, targets: str = "class") -> dict[str, Any]:
    """Checked tensors, per-channel statistics of the training images, and a digest of everything."""
    if not isinstance(images, Images):
        raise UserError(f"dataset {name}: read() returned {type(images).__name__}, not trainer.data.Images")
    classes = [str(c) for c in images.classes]
    if not classes:
        raise UserError(f"dataset {name}: no class names")
    record: dict[str, Any] = {"classes": classes}
    for split in ("train", "test", "val"):
        x, y = getattr(images, f"{split}_x"), getattr(images, f"{split}_y")
        if (x is None) != (y is None):
            raise UserError(f"dataset {name}: {split} images without labels, or labels without images")
        if x is not None:
            record[f"{split}_x"] = as_images(x, f"dataset {name} ({split} split)")
            where = f"dataset {name} ({split} split)"
            record[f"{split}_y"] = (as_labels(y, len(record[f"{split}_x"]), len(classes), where) if targets == "class"
                                    else as_targets(y, len(record[f"{split}_x"]), len(classes), targets, where))
    shape = tuple(record["train_x"].shape[1:])
    for split in ("test", "val"):
        if f"{split}_x" in record and tuple(record[f"{split}_x"].shape[1:]) != shape:
            raise UserError(f"dataset {name}: {split} images are {tuple(record[f'{split}_x'].shape[1:])}, training "
                            f"images {shape} (C, H, W)")
    if len(record["train_y"]) == 0:
        raise UserError(f"dataset {name}: no training images")
    record["mean"], record["std"] = channel_stats(record["train_x"])
    record["digest"] = digest(record)
    return record


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in units of the 0-1 range."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)  # (C, n*H*W)
        total += x.sum(dim=1)
        squares += (x * x).sum(dim=1)
    n = images.numel() // c
    mean = total / n
    std = (squares / n - mean * mean).clamp(min=0).sqrt()
    return [round(float(m) / 255, 4) for m in mean], [max(round(float(s) / 255, 4), 1e-4) for s in std]
