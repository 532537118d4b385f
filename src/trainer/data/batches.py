"""Batches of in-memory uint8 images: a seeded gather, then normalisation and augmentation on the whole batch.

No per-sample Python, no PIL, no DataLoader workers: a batch is one `index_select` on a tensor that
already lives on the device (or, for data too big for it, in pinned host memory, copied per batch).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError, is_number, require_int
from trainer.system import canonical_device

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed for one epoch's shuffle, so any epoch's order can be rebuilt from (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def check_augmentation(augment_shift: int, augment_rotate: float, augment_cutout: int, random_crop: int) -> None:
    """Raise UserError naming the first bad `dataset.` augmentation setting."""
    for key, value in (("augment_shift", augment_shift), ("random_crop", random_crop),
                       ("augment_cutout", augment_cutout)):
        require_int(f"dataset.{key}", value, 0)
    if not (is_number(augment_rotate) and 0 <= augment_rotate <= 180):
        raise UserError(f"dataset.augment_rotate={augment_rotate!r}: must be a number of degrees from 0 to 180")


def check_augmentation_fits(in_shape: tuple[int, int, int], augment_shift: int, augment_cutout: int,
                            random_crop: int) -> None:
    """Raise UserError if a shift, cut-out square or crop padding is as large as the (C, H, W) images: each would
    leave some images blank, or nothing of them."""
    for key, value, what in (("random_crop", random_crop, "the padding (by reflection)"),
                             ("augment_shift", augment_shift, "the shift"),
                             ("augment_cutout", augment_cutout, "the cut-out square's side")):
        if value >= min(in_shape[1:]):
            raise UserError(f"dataset.{key}={value}: {what} must be smaller than the {in_shape[1]}x{in_shape[2]} "
                            "images")


class BatchTransform:
    """uint8 images -> normalised float images, with optional batched augmentation (training only).

    `mean` and `std` are one value, or one per channel, in units of the 0-1 range. Augmentations, in the
    order applied: `max_shift` (translate by up to that many pixels, filling with 0: digits) and `max_degrees`
    (rotate by up to that many degrees either way) in one affine resampling, `crop_padding` (a random crop of
    the image padded by that many pixels, by reflection: the usual CIFAR augmentation), `hflip` (a left-right
    mirror of half the images), `cutout` (a square of that side set to 0 at a random place in each image).
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float], max_shift: int = 0,
                 crop_padding: int = 0, hflip: bool = False, max_degrees: float = 0.0, cutout: int = 0) -> None:
        self.mean = [float(m) for m in mean] if isinstance(mean, (list, tuple)) else [float(mean)]
        self.std = [float(s) for s in std] if isinstance(std, (list, tuple)) else [float(std)]
        self.max_shift, self.crop_padding, self.hflip = max_shift, crop_padding, hflip
        self.max_degrees, self.cutout = max_degrees, cutout
        # One value for every channel: the exact arithmetic MNIST runs have always used (same results per seed).
        self.uniform = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        self.scale = 1.0 / (255.0 * self.std[0])
        self.bias = -self.mean[0] / self.std[0]
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, made once

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        consts = self._constants.get(device)
        if consts is None:  # made once per device: a tensor made per batch would copy to the GPU every step
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32).view(-1, 1, 1)
            bias = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32).view(-1, 1, 1)
            if self.uniform:
                scale, bias = scale.new_tensor(self.scale), bias.new_tensor(self.bias)  # 0-dim
            consts = self._constants[device] = (scale.to(device), bias.to(device))
        return consts

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> float32
        if self.max_degrees:
            images = random_rotate_and_shift(images, self.max_degrees, self.max_shift)  # float, 0-255
        elif self.max_shift:  # an exact gather of whole pixels (what runs without rotation always did)
            images = random_shift(images, self.max_shift)
        if self.crop_padding:
            images = random_crop(images, self.crop_padding)
        if self.hflip:
            images = random_hflip(images)
        if self.cutout:
            images = random_cutout(images, self.cutout)
        scale, bias = self._on(images.device)
        if self.uniform:
            # bias + scale * x in one pass: a float32 0-dim tensor makes the result float32, and the kernel converts
            # each uint8 as it reads it (images.float() first would be a second pass over the batch, and a copy).
            return torch.add(bias, images, alpha=self.scale)
        return torch.addcmul(bias, images, scale)  # bias_c + x * scale_c, converting as it reads, one pass

    def exportable(self) -> nn.Module:
        """The same normalisation, bit for bit, without augmentation, as a module whose constants are buffers:
        the form exporters trace (a tensor made inside forward would be baked in as an unregistered constant)."""
        return Normalise(self)


class Normalise(nn.Module):
    """`BatchTransform`'s normalisation for export: (B, C, H, W) uint8 -> float32."""

    def __init__(self, transform: BatchTransform) -> None:
        super().__init__()
        scale, bias = transform._on(torch.device("cpu"))
        self.uniform = transform.uniform
        self.scale_value, self.bias_value = transform.scale, transform.bias
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias", bias.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uniform:  # two plain ops with Python numbers: what training's one op computes
            return torch.add(self.bias_value, images.float(), alpha=self.scale_value)
        return torch.addcmul(self.bias, images.float(), self.scale)


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


def random_rotate_and_shift(images: torch.Tensor, max_degrees: float, max_shift: int) -> torch.Tensor:
    """Rotate each image about its centre by its own random angle in [-max_degrees, max_degrees] and translate
    it by its own whole-pixel (dy, dx) in [-max_shift, max_shift], in one batched affine_grid/grid_sample pass
    (bilinear, 0 outside). uint8 (B, C, H, W) in, float32 (B, C, H, W) in 0-255 out."""
    b, c, h, w = images.shape
    dev = images.device
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(max_degrees)  # (B,)
    cos, sin = angle.cos(), angle.sin()
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=dev).float()  # (B, 2): dx, dy in pixels
    # theta maps output to input coordinates in [-1, 1] (x right, y down): rotation, then the translation in
    # those units (a pixel is 2/W wide); the aspect ratio is kept by scaling sin with H/W and W/H.
    theta = torch.stack([torch.stack([cos, -sin * h / w, -shift[:, 0] * 2 / w], dim=1),
                         torch.stack([sin * w / h, cos, -shift[:, 1] * 2 / h], dim=1)], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_cutout(images: torch.Tensor, size: int) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017): a size x size square, centred at a random pixel of each image (so it may
    lie partly outside), set to 0. Any dtype (B, C, H, W) in and out."""
    b, _, h, w = images.shape
    dev = images.device
    top = torch.randint(0, h, (b, 1, 1), device=dev) - size // 2  # (B, 1, 1): the square's first row
    left = torch.randint(0, w, (b, 1, 1), device=dev) - size // 2
    rows = torch.arange(h, device=dev).view(1, h, 1) - top  # (B, H, 1): 0 .. size-1 inside the square
    cols = torch.arange(w, device=dev).view(1, 1, w) - left
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)  # (B, H, W)
    return images.masked_fill(inside.unsqueeze(1), 0)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image, a random crop of its original size out of the image padded by `padding` pixels per side by
    reflection (torchvision's RandomCrop(size, padding, padding_mode="reflect"), batched): no padding is made,
    each output pixel is gathered from its reflected source position."""
    b, c, h, w = images.shape  # padding < min(h, w): checked by ImageDataset
    dev = images.device
    dy = torch.randint(-padding, padding + 1, (b, 1, 1), device=dev)
    dx = torch.randint(-padding, padding + 1, (b, 1, 1), device=dev)
    rows = _reflect(torch.arange(h, device=dev).view(1, h, 1) + dy, h)  # (B, H, 1)
    cols = _reflect(torch.arange(w, device=dev).view(1, 1, w) + dx, w)  # (B, 1, W)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside [0, size) mirrored back inside, without repeating the edge (-1 -> 1, size -> size-2)."""
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5  # (B, 1, 1, 1)
    return torch.where(flip, images.flip(3), images)


class BatchLoader:
    """Iterates `(images, labels)` batches over tensors that already live on the device.

    `indices` picks the samples (a split of a larger tensor, without copying it); None means all of them.
    With `shuffle`, epoch `e` visits the samples in the order `randperm` gives for `epoch_seed(seed, e)` (with
    `weights`, as many draws with replacement, in proportion to them: see `epoch_order`); call `set_epoch(e)`
    before iterating. `start_step` skips that many batches of the epoch, so a
    run resumed mid-epoch sees exactly the batches it has not yet seen.

    After `shard(rank, world_size)` a step is a global batch of `world_size * batch_size` samples of the
    same permutation, of which this rank takes the `rank`-th `batch_size` slice: the ranks see disjoint
    samples in an order that depends on (seed, epoch) only, so a resume stays exact.

    Batches are made on `images.device`, or, when `device` is another one (data kept in pinned host memory
    because it does not fit on the GPU), gathered on the host and copied to `device` without waiting.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 transform: BatchTransform, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 indices: torch.Tensor | None = None, device: torch.device | None = None,
                 weights: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        # (n,) float64 sampling weights of the samples (dataset.sampler=balanced), on the host: with them an epoch
        # is n draws with replacement, in proportion to the weights, instead of a permutation
        self.cdf = None if weights is None else torch.cumsum(weights.to(torch.float64).cpu(), 0)
        self.device = images.device if device is None else canonical_device(device)
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
        if isinstance(which, torch.Tensor):
            which = which.to(self.images.device)
        if self.indices is None:
            return self._to_device(self.images[which], self.labels[which])
        idx = self.indices[which]
        return self._to_device(self.images.index_select(0, idx), self.labels.index_select(0, idx))

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        if images.device == self.device:
            return images, labels
        # pinned host memory -> device: the copy overlaps the previous step's compute (no host sync)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _gather(self, idx: torch.Tensor) -> Batch:
        """Samples at positions `idx` of images/labels, on `self.device`."""
        if self.images.device == self.device:
            # index_select, not images[idx]: advanced indexing is ~8x slower on CPU
            return self.images.index_select(0, idx), self.labels.index_select(0, idx)
        pin = self.device.type == "cuda"  # only a page-locked source lets the copy run asynchronously
        x = torch.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pin)
        y = torch.empty(len(idx), dtype=self.labels.dtype, pin_memory=pin)
        torch.index_select(self.images, 0, idx, out=x)
        torch.index_select(self.labels, 0, idx, out=y)
        return self._to_device(x, y)

    def epoch_order(self) -> torch.Tensor:
        """The positions (n,) int64 of this epoch's samples, in order: a seeded permutation, or with weights
        (the balanced sampler) n seeded draws with replacement. The same on every rank, from (seed, epoch) only."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.cdf is None:
            return torch.randperm(self.num_items, generator=g)
        # inverse-CDF sampling: no category limit (torch.multinomial takes at most 2**24), O(n log n)
        draws = torch.rand(self.num_items, generator=g, dtype=torch.float64) * self.cdf[-1]  # (n,)
        return torch.searchsorted(self.cdf, draws, right=True).clamp_(max=self.num_items - 1)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_step: int) -> Iterator[Batch]:
        order = self.indices  # (n,) positions in images/labels, or None: all of them, in stored order
        if self.shuffle:
            perm = self.epoch_order().to(self.images.device)  # (n,)
            order = perm if order is None else order.index_select(0, perm)
        for step in range(start_step, len(self)):
            first = step * self.global_batch_size + self.rank * self.batch_size
            if first >= self.num_items:  # this rank's share of an evaluation set's last batch is empty
                return
            sl = slice(first, first + self.batch_size)
            x, y = self._to_device(self.images[sl], self.labels[sl]) if order is None else self._gather(order[sl])
            yield self.transform(x), y


class StreamingLoader(BatchLoader):
    """A training BatchLoader over images too large for memory, memory-mapped from the cache on disk: each epoch
    reads them window by window, each window a few blocks of neighbouring images read whole.

    The order of an epoch, from (seed, epoch) only, as BatchLoader's: the positions (in stored order: `indices` must
    be sorted) are cut into blocks of `block` neighbours; the blocks are shuffled; consecutive runs of
    `window_blocks` blocks form a window, whose images are shuffled among themselves. A batch draws from one
    window; a window is read as one contiguous span per block (sequential reads) into memory, then gathered from.
    Randomness is coarser than a full permutation: two images of one block always share a window, so they come in
    the same stretch of batches, though in any order within it; blocks small against the window keep windows
    diverse. The same on every rank, and a run resumed mid-epoch continues the same windows.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, block: int,
                 window_blocks: int, **kwargs: Any) -> None:
        super().__init__(images, labels, batch_size, **kwargs)
        if self.indices is not None and len(self.indices) > 1 and bool((self.indices[1:] < self.indices[:-1]).any()):
            raise ValueError("StreamingLoader: indices must be sorted (stored order), for local reads")
        self.block, self.window_blocks = block, window_blocks

    @property
    def window(self) -> int:
        """Positions per window: whole global batches, so no batch straddles two windows."""
        per = self.block * self.window_blocks
        return max(1, per // self.global_batch_size) * self.global_batch_size

    def epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n, block = self.num_items, self.block
        blocks = torch.randperm(math.ceil(n / block), generator=g)  # (n_blocks,)
        order = (blocks[:, None] * block + torch.arange(block)).flatten()  # (n_blocks * block,) positions
        order = order[order < n]  # the last block may be short
        # within each window, a shuffle: sort by (window, random key)
        window = torch.arange(len(order)) // self.window
        key = torch.rand(len(order), generator=g, dtype=torch.float64)
        return order[torch.argsort(window.double() * 2 + key)]  # key < 1: windows never interleave

    def iter_from(self, start_step: int) -> Iterator[Batch]:
        order = self.epoch_order() if self.shuffle else torch.arange(self.num_items)
        stored = order if self.indices is None else self.indices.index_select(0, order)  # (n,) rows of images
        span = self.window
        first_window = start_step * self.global_batch_size // span
        for w_start in range(first_window * span, self.num_items, span):
            rows = stored[w_start:w_start + span]  # this window's rows, in their epoch order
            buffer_x, buffer_y, at = self._read(rows)
            for step in range(max(start_step, w_start // self.global_batch_size),
                              min(len(self), math.ceil((w_start + span) / self.global_batch_size))):
                first = step * self.global_batch_size + self.rank * self.batch_size
                if first >= self.num_items:
                    return
                local = at[first - w_start:first - w_start + self.batch_size]  # rows -> buffer positions
                x, y = self._to_device(*self._pinned(buffer_x.index_select(0, local), buffer_y.index_select(0, local)))
                yield self.transform(x), y

    def _read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The images and labels of `rows` (stored positions), read as one contiguous span per run of neighbouring
        rows into memory; and where each of `rows` is in that buffer."""
        unique = torch.unique(rows)  # sorted
        # runs of rows close enough to read their whole span (the rows between are read too: at most a block's
        # worth of other splits' images, as the blocks are neighbours in stored order)
        breaks = torch.nonzero(unique[1:] - unique[:-1] > self.block).flatten() + 1
        starts = torch.cat([unique[:1], unique[breaks]])
        ends = torch.cat([unique[breaks - 1], unique[-1:]]) + 1
        spans = list(zip(starts.tolist(), ends.tolist()))
        buffer_x = torch.cat([self.images[a:b] for a, b in spans])  # sequential reads of the file's pages
        buffer_y = torch.cat([self.labels[a:b] for a, b in spans])
        offsets = torch.cumsum(torch.tensor([0] + [b - a for a, b in spans[:-1]]), 0)  # (spans,)
        which = torch.searchsorted(starts, rows, right=True) - 1  # (n,) the span of each row
        return buffer_x, buffer_y, offsets[which] + rows - starts[which]

    def _pinned(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        return (x.pin_memory(), y.pin_memory()) if self.device.type == "cuda" else (x, y)
