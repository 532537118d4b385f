"""MNIST-style datasets held in memory on the training device and batched by slicing.

Each split is parsed once into a uint8 tensor (N, 1, 28, 28) and moved to the device. A batch is a
gather with a seeded permutation; conversion to float, normalisation and augmentation run on the
whole batch on the device. No per-sample Python, no PIL, no DataLoader workers.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainer import provision
from trainer.errors import OutputError, UserError, require_int
from trainer.fsutil import atomic_write
from trainer.idx import check_idx

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed for one epoch's shuffle, so any epoch's order can be rebuilt from (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class BatchTransform:
    """uint8 images -> normalised float images, with optional random shifts (augmentation)."""

    def __init__(self, mean: float, std: float, max_shift: int = 0) -> None:
        self.scale = 1.0 / (255.0 * std)
        self.bias = -mean / std
        self.max_shift = max_shift
        self._bias_on: dict[torch.device, torch.Tensor] = {}  # the bias as a 0-dim float32 tensor, per device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> float32
        if self.max_shift:
            images = random_shift(images, self.max_shift)
        bias = self._bias_on.get(images.device)
        if bias is None:  # made once per device: a tensor made per batch would copy to the GPU every step
            bias = self._bias_on[images.device] = torch.tensor(self.bias, dtype=torch.float32, device=images.device)
        # bias + scale * x in one pass: a float32 0-dim tensor makes the result float32, and the kernel converts
        # each uint8 as it reads it (images.float() first would be a second pass over the batch, and a copy).
        return torch.add(bias, images, alpha=self.scale)

    def unshifted_two_ops(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> float32
        """The same normalisation, bit for bit, as two plain ops (convert, then add) and without augmentation:
        the form exporters trace (the one-op form's 0-dim tensor would be baked in as an unregistered constant)."""
        return torch.add(self.bias, images.float(), alpha=self.scale)


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], filling with 0."""
    b, c, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p))  # (B, C, H+2p, W+2p)
    dev = images.device
    dy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=dev)
    dx = torch.randint(0, 2 * p + 1, (b, 1, 1), device=dev)
    rows = torch.arange(h, device=dev).view(1, h, 1) + dy  # (B, H, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w) + dx  # (B, 1, W)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W), NCHW like the unaugmented batches


class BatchLoader:
    """Iterates `(images, labels)` batches over tensors that already live on the device.

    `indices` picks the samples (a split of a larger tensor, without copying it); None means all of them.
    With `shuffle`, epoch `e` visits the samples in the order `randperm` gives for `epoch_seed(seed, e)`;
    call `set_epoch(e)` before iterating. `start_step` skips that many batches of the epoch, so a
    run resumed mid-epoch sees exactly the batches it has not yet seen.

    After `shard(rank, world_size)` a step is a global batch of `world_size * batch_size` samples of the
    same permutation, of which this rank takes the `rank`-th `batch_size` slice: the ranks see disjoint
    samples in an order that depends on (seed, epoch) only, so a resume stays exact.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 transform: BatchTransform, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 indices: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.num_items = len(labels) if indices is None else len(indices)
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Take only rank `rank`'s part of every batch. A shuffled (training) loader drops the last
        incomplete global batch, as every rank must take the same number of optimizer steps."""
        self.rank, self.world_size = rank, world_size
        if self.shuffle and world_size > 1:
            self.drop_last = True
            if len(self) == 0:
                raise UserError(f"{self.num_items} training samples do not fill one batch of {self.batch_size} for "
                                f"each of {world_size} processes; use fewer processes or a smaller dataset.batch_size")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_items, self.global_batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    @property
    def num_samples(self) -> int:
        return self.samples_between(0, len(self))

    def samples_between(self, start_step: int, stop_step: int) -> int:
        """How many samples batches `start_step` up to (not including) `stop_step` hold, on all ranks together."""
        b = self.global_batch_size
        return min(self.num_items, stop_step * b) - min(self.num_items, start_step * b)

    def positions(self, limit_steps: int | None = None) -> torch.Tensor:
        """The stored-order positions of the samples this rank visits in an unshuffled pass, (n,) int64."""
        steps = range(len(self) if limit_steps is None else min(len(self), limit_steps))
        starts = [s * self.global_batch_size + self.rank * self.batch_size for s in steps]
        return torch.cat([torch.arange(a, min(a + self.batch_size, self.num_items)) for a in starts if
                          a < self.num_items] or [torch.empty(0, dtype=torch.int64)])

    def raw(self, which: slice | torch.Tensor = slice(None)) -> Batch:
        """Samples untransformed, by position in stored (unshuffled) order: (n, C, H, W) uint8, (n,)."""
        if self.indices is None:
            return self.images[which], self.labels[which]
        idx = self.indices[which]
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_step: int) -> Iterator[Batch]:
        order = self.indices  # (n,) positions in images/labels, or None: all of them, in stored order
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            perm = torch.randperm(self.num_items, generator=g).to(self.labels.device)  # (n,)
            order = perm if order is None else order.index_select(0, perm)
        for step in range(start_step, len(self)):
            first = step * self.global_batch_size + self.rank * self.batch_size
            if first >= self.num_items:  # this rank's share of an evaluation set's last batch is empty
                return
            sl = slice(first, first + self.batch_size)
            if order is None:
                x, y = self.images[sl], self.labels[sl]
            else:
                idx = order[sl]
                # index_select, not images[idx]: advanced indexing is ~8x slower on CPU
                x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            yield self.transform(x), y


class IDXImageDataset:
    """An MNIST-style dataset: official train/test split, a seeded validation split held out of train.

    Subclasses name the torchvision dataset (`name`, which is also its folder under `root`) and
    its classes. Exposes `train`, `val` and `test` BatchLoaders, `in_shape` and `num_classes`.
    """

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    in_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)  # (C, H, W) of every image; checked on load

    def __init__(self, *, root: str, batch_size: int, eval_batch_size: int, val_size: int, split_seed: int,
                 mean: float, std: float, augment_shift: int, shuffle: bool, drop_last: bool, download: bool,
                 mirror: str | None, verify: bool, device: torch.device | str = "cpu", seed: int = 0) -> None:
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("val_size", val_size, 0), ("augment_shift", augment_shift, 0)):
            require_int(f"dataset.{key}", value, low)
        if not isinstance(std, (int, float)) or std <= 0:
            raise UserError(f"dataset.std={std!r}: must be a number > 0")
        self.root = Path(root).expanduser()
        train_x, train_y, test_x, test_y = self._load(download, Path(mirror).expanduser() if mirror else None,
                                                      verify)
        for images in (train_x, test_x):
            if tuple(images.shape[1:]) != self.in_shape:
                raise UserError(f"{self.root / self.name}: images are {tuple(images.shape[1:])}, "
                                f"{self.name} images are {self.in_shape} (C, H, W)")
        if val_size >= len(train_y):
            raise UserError(f"dataset.val_size={val_size}: must be smaller than the {len(train_y)} training images")
        # The split depends on split_seed only, so every run of a sweep validates on the same images.
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(split_seed))
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        device = torch.device(device)
        # train and val index into one copy of the training images: a copy per split would cost 47 MB more.
        train_x, train_y = train_x.to(device), train_y.to(device)
        train_tf = BatchTransform(mean, std, augment_shift)
        eval_tf = BatchTransform(mean, std)
        self.train = BatchLoader(train_x, train_y, batch_size, transform=train_tf, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last, indices=train_idx.to(device))
        self.val = BatchLoader(train_x, train_y, eval_batch_size, transform=eval_tf, shuffle=False,
                               indices=val_idx.to(device))
        self.test = BatchLoader(test_x.to(device), test_y.to(device), eval_batch_size, transform=eval_tf,
                                shuffle=False)
        self.num_classes = len(self.classes)

    def shard(self, rank: int, world_size: int) -> None:
        """Give this process (`rank` of `world_size`) its disjoint part of every split (see BatchLoader.shard)."""
        for loader in (self.train, self.val, self.test):
            loader.shard(rank, world_size)

    def _load(self, download: bool, mirror: Path | None, verify: bool) -> tuple[torch.Tensor, ...]:
        """Provision, check and parse the raw files; cache the parsed tensors for the next run."""
        raw = provision.provision(self.name, self.root, download=download, mirror=mirror)
        cache = raw.parent / "tensors.pt"
        stamp = [[f, os.stat(raw / f).st_size, os.stat(raw / f).st_mtime_ns] for f in provision.FILES]
        if cache.is_file():
            try:
                cached = torch.load(cache, weights_only=True, mmap=True)
                if cached["stamp"] == stamp and (cached["verified"] or not verify):
                    return cached["train_x"], cached["train_y"], cached["test_x"], cached["test_y"]
            except Exception as e:  # a stale or torn cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s: %s", cache, e)
        for f in provision.FILES:
            check_idx(raw / f, ndim=3 if "images" in f else 1)
        if verify:
            provision.verify(self.root, self.name)
        import torchvision.datasets  # slow import (seconds): only on the first run over these files

        splits = []
        for train in (True, False):
            ds = getattr(torchvision.datasets, self.name)(self.root, train=train)
            images, labels = ds.data, ds.targets.to(torch.int64)
            if len(images) != len(labels):
                raise UserError(f"{raw}: {len(images)} images but {len(labels)} labels in the "
                                f"{'train' if train else 't10k'} split")
            if len(labels) and int(labels.max()) >= len(self.classes):
                raise UserError(f"{raw}: label {int(labels.max())} out of range for {len(self.classes)} classes")
            splits += [images.unsqueeze(1).contiguous(), labels]  # (N, 1, H, W) uint8, (N,) int64
        train_x, train_y, test_x, test_y = splits
        try:
            with atomic_write(cache) as f:
                torch.save({"stamp": stamp, "verified": verify, "train_x": train_x, "train_y": train_y,
                            "test_x": test_x, "test_y": test_y}, f)
        except OutputError as e:  # the cache only saves the next run some seconds
            log.warning("parsed tensors not cached: %s", e)
        return train_x, train_y, test_x, test_y


class MNIST(IDXImageDataset):
    name = "MNIST"
    classes = tuple(str(d) for d in range(10))


class FashionMNIST(IDXImageDataset):
    name = "FashionMNIST"
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
