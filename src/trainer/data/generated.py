"""Generated datasets for tasks other than classification: counting (Poisson counts), multi-label and regression.

Each function returns the arrays of a tensors file (`dataset=tensors`, see tensors.py): train_x, train_y, test_x,
test_y and classes, ready for `np.savez`. Images are uint8 (N, H, W). The output is a function of the arguments
alone: the same seed gives the same bytes. The train and test splits draw from independent streams spawned from
the seed, so the test set does not change with the size of the training set. `scripts/make_task_data.py` writes
them to files.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_OBJECTS = 15  # the most objects a 32x32 counts image holds; 15 still places at the first try 84% of the time
PLACEMENT_TRIES = 1000
NOISE = 24  # background noise is 0..NOISE-1, far below the dimmest object (160), so a threshold at 128 separates them
MNIST_SHAPE = (28, 28)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """One generator for the train split and one for the test split, independent of each other."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an integer >= 0")
    train, test = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.Generator(np.random.PCG64(train)), np.random.Generator(np.random.PCG64(test))


def _require_count(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    return int(value)


def _require_images(name: str, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != MNIST_SHAPE or not len(images):
        raise ValueError(f"{name}: expected uint8 images of shape (N, 28, 28) with N >= 1, got {images.dtype} "
                         f"{images.shape}")
    return images


def _require_labels(name: str, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{name}: digit labels are 0..9, got {labels.min()}..{labels.max()}")
    return labels


# --- counts ---------------------------------------------------------------------------------------------------------


def _templates() -> list[np.ndarray]:
    """The object shapes, as boolean masks, largest first: discs of radius 3 and 2 and squares of half-side 3 and 2
    (side 6 and 4, close to the discs' areas of 37 and 21 pixels, so the size of an object does not give away its
    shape)."""
    shapes = []
    for r in (3, 2):
        d = np.arange(-r, r + 1)
        shapes.append(d[:, None] ** 2 + d[None, :] ** 2 <= r * (r + 1))  # r*(r+1), not r*r: rounder at this size
        shapes.append(np.ones((2 * r, 2 * r), dtype=bool))
    return shapes


def _place(rng: np.random.Generator, image: np.ndarray, k: int, shapes: list[np.ndarray]) -> None:
    """Draw `k` objects into `image` (size, size) uint8, each at a position drawn uniformly among those where its
    bounding box keeps a gap of at least one pixel to every object before it: objects never touch, even diagonally,
    so each is one connected component. A layout that runs out of room is drawn again from the start."""
    size = image.shape[0]
    for _ in range(PLACEMENT_TRIES):
        # sorted: the largest shapes go first, while there is room for them, which makes dead ends rarer
        kinds = np.sort(rng.integers(0, len(shapes), k))
        levels = rng.integers(160, 256, k)
        taken = np.zeros((size, size), dtype=bool)  # object boxes, each grown by the one-pixel gap
        table = np.zeros((size + 1, size + 1), dtype=np.int32)  # summed-area table of `taken`, zero-padded
        placed = []
        for kind in kinds:
            b = shapes[kind].shape[0]
            n = size - b + 1
            inside = table[b:, b:] - table[:n, b:] - table[b:, :n] + table[:n, :n]  # (n, n) taken pixels per box
            free = np.flatnonzero(inside == 0)
            if not free.size:
                break
            y, x = divmod(int(free[rng.integers(free.size)]), n)
            placed.append((kind, y, x))
            taken[max(y - 1, 0):y + b + 1, max(x - 1, 0):x + b + 1] = True
            table[1:, 1:] = taken.cumsum(0).cumsum(1)
        else:
            for (kind, y, x), level in zip(placed, levels):
                mask = shapes[kind]
                box = image[y:y + mask.shape[0], x:x + mask.shape[1]]
                box[mask] = level  # the noise under an object is replaced: objects are flat, clearly above it
            return
    raise RuntimeError(f"could not place {k} objects in a {size}x{size} image in {PLACEMENT_TRIES} tries")


def _counts_split(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` counting images (n, size, size) uint8 and their counts (n,) float32."""
    # A rate per image, then a Poisson count: a wider spread of counts than one rate gives (over-dispersed)
    rates = rng.uniform(0.5, 6.0, n)
    counts = np.minimum(rng.poisson(rates), MAX_OBJECTS)  # (n,); only ~1e-4 of the draws exceed 15
    images = rng.integers(0, NOISE, (n, size, size), dtype=np.uint8)  # faint noise on black
    shapes = _templates()
    for image, k in zip(images, counts):
        _place(rng, image, int(k), shapes)
    return images, counts.astype(np.float32)


def counts(seed: int = 0, train: int = 20000, test: int = 4000, size: int = 32) -> dict[str, np.ndarray]:
    """Images of a few small bright objects (discs and squares) to count: a regression target with Poisson noise.

    Each (size, size) uint8 image holds k non-touching objects, each a flat level in 160..255, on faint noise
    (0..23); k is Poisson with a rate drawn per image from Uniform(0.5, 6), capped at 15. Labels are k as float32.
    Returns train_x (train, size, size) uint8, train_y (train,) float32, test_x (test, size, size) uint8,
    test_y (test,) float32 and classes ["count"].
    """
    train, test = _require_count("train", train), _require_count("test", test)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 24:
        raise ValueError(f"size={size!r}: must be an integer >= 24 (room for {MAX_OBJECTS} objects)")
    train_rng, test_rng = _streams(seed)
    train_x, train_y = _counts_split(train_rng, train, int(size))
    test_x, test_y = _counts_split(test_rng, test, int(size))
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "classes": np.array(["count"])}


# --- mosaic -------------------------------------------------------------------------------------------------------


def _mosaic_split(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, n: int,
                  p: float) -> tuple[np.ndarray, np.ndarray]:
    """`n` 2x2 mosaics (n, 56, 56) uint8 of digits from `images` (N, 28, 28), and their multi-hot labels (n, 10)."""
    present = rng.random((n, 4)) < p  # (n, 4): cells in row-major order
    blank = ~present.any(axis=1)
    while blank.any():  # at least one digit: redraw the empty mosaics only, keeping each cell's chance otherwise
        present[blank] = rng.random((int(blank.sum()), 4)) < p
        blank = ~present.any(axis=1)
    chosen = rng.integers(0, len(images), (n, 4))  # (n, 4) source indices, drawn for empty cells too
    cells = images[chosen] * present[:, :, None, None].astype(np.uint8)  # (n, 4, 28, 28)
    # (n, 4, 28, 28) -> (n, 2, 2, 28, 28) [row, col] -> (n, 2, 28, 2, 28) [row, y, col, x] -> (n, 56, 56)
    h, w = images.shape[1:]
    x = cells.reshape(n, 2, 2, h, w).transpose(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)
    digits = labels[chosen]  # (n, 4)
    y = ((digits[:, :, None] == np.arange(10)) & present[:, :, None]).any(axis=1)  # (n, 10)
    return np.ascontiguousarray(x), y.astype(np.uint8)


def mosaic(mnist_images: np.ndarray, mnist_labels: np.ndarray, mnist_test_images: np.ndarray,
           mnist_test_labels: np.ndarray, seed: int = 0, train: int = 30000, test: int = 5000,
           p: float = 0.6) -> dict[str, np.ndarray]:
    """2x2 mosaics of MNIST digits, labelled with the set of digits they show: a multi-label task.

    Each 56x56 uint8 image is a 2x2 grid of 28x28 cells; each cell holds a random digit with probability `p`,
    else stays black, and an image with no digit is drawn again. Train mosaics take their digits from the MNIST
    train split (`mnist_images` (N, 28, 28) uint8, `mnist_labels` (N,) 0..9), test mosaics from the test split.
    Returns train_x (train, 56, 56) uint8, train_y (train, 10) uint8 multi-hot (1 where that digit appears, however
    often), test_x, test_y likewise, and classes ["0", ..., "9"].
    """
    train, test = _require_count("train", train), _require_count("test", test)
    if not 0 < p <= 1:
        raise ValueError(f"p={p!r}: must be in (0, 1]")
    sources = []
    for name, images, labels in (("mnist_images", mnist_images, mnist_labels),
                                 ("mnist_test_images", mnist_test_images, mnist_test_labels)):
        images = _require_images(name, images)
        sources.append((images, _require_labels(name.replace("images", "labels"), labels, images)))
    train_rng, test_rng = _streams(seed)
    train_x, train_y = _mosaic_split(train_rng, *sources[0], train, p)
    test_x, test_y = _mosaic_split(test_rng, *sources[1], test, p)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "classes": np.array([str(d) for d in range(10)])}


# --- rotation -------------------------------------------------------------------------------------------------------


def rotate(images: np.ndarray, degrees: np.ndarray, batch: int = 4096) -> np.ndarray:
    """`images` (N, H, W) uint8, each turned counter-clockwise (as displayed, the way torchvision's `rotate` turns)
    by its angle in `degrees` (N,) about its centre: bilinear, black outside. Returns (N, H, W) uint8.

    One affine grid per batch rather than an image at a time; rounding (not truncating) to uint8 makes a zero angle
    return the image exactly, where the grid's coordinates are off by a rounding error.
    """
    images, degrees = np.asarray(images), np.asarray(degrees, dtype=np.float64)
    if images.ndim != 3 or degrees.shape != (len(images),):
        raise ValueError(f"rotate: expected images (N, H, W) and N angles, got {images.shape} and {degrees.shape}")
    n, h, w = images.shape
    out = np.empty_like(images)
    for start in range(0, n, batch):
        a = torch.from_numpy(np.deg2rad(degrees[start:start + batch]))
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        # The grid maps each output pixel back to where it comes from: the inverse rotation, in y-down coordinates.
        # On a non-square image, normalised x and y differ in scale: the w/h and h/w keep the turn rigid.
        theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                             torch.stack([sin * w / h, cos, zero], 1)], 1).float()  # (B, 2, 3)
        x = torch.from_numpy(images[start:start + batch]).float().unsqueeze(1)  # (B, 1, H, W)
        grid = torch.nn.functional.affine_grid(theta, [len(x), 1, h, w], align_corners=False)  # (B, H, W, 2)
        turned = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:start + batch] = turned.squeeze(1).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _each_once(rng: np.random.Generator, available: int, n: int) -> np.ndarray:
    """`n` indices into `available` items: a random order of all of them, then another, ..., so no item is used
    twice before every item has been used once."""
    rounds = math.ceil(n / available)
    return np.concatenate([rng.permutation(available) for _ in range(rounds)])[:n]


def rotation(mnist_images: np.ndarray, mnist_test_images: np.ndarray, seed: int = 0, train: int = 30000,
             test: int = 5000, max_degrees: float = 45.0) -> dict[str, np.ndarray]:
    """MNIST digits turned by a random angle, labelled with that angle: a regression task.

    Each 28x28 uint8 image is a digit (train images from `mnist_images`, test images from `mnist_test_images`, both
    (N, 28, 28) uint8; no digit is used twice before every digit of its split has been used once) turned
    counter-clockwise by an angle drawn uniformly in [-max_degrees, max_degrees] (see `rotate`).
    Returns train_x (train, 28, 28) uint8, train_y (train,) float32 angles in degrees, test_x, test_y likewise, and
    classes ["angle"].
    """
    train, test = _require_count("train", train), _require_count("test", test)
    if not 0 <= max_degrees <= 180:
        raise ValueError(f"max_degrees={max_degrees!r}: must be in [0, 180]")
    sources = [_require_images("mnist_images", mnist_images), _require_images("mnist_test_images", mnist_test_images)]
    arrays = {}
    for split, rng, images, n in zip(("train", "test"), _streams(seed), sources, (train, test)):
        chosen = _each_once(rng, len(images), n)  # (n,)
        # float32 first: the image is turned by exactly the angle its label says
        angles = rng.uniform(-max_degrees, max_degrees, n).astype(np.float32)  # (n,)
        arrays[f"{split}_x"] = rotate(images[chosen], angles)  # (n, 28, 28)
        arrays[f"{split}_y"] = angles
    return {**arrays, "classes": np.array(["angle"])}


# --- long-tailed classification ---------------------------------------------------------------------------------------


def long_tailed(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                classes: list[str], seed: int = 0, imbalance: float = 100.0, head: int | None = None,
                test: int | None = None) -> dict[str, np.ndarray]:
    """A long-tailed version of a balanced classification set (Cui et al., 2019, "Class-Balanced Loss"): class c
    of K keeps head * imbalance ** (-c / (K - 1)) of its training images, from `head` (default: the smallest
    class's count) for class 0 down to head / imbalance for the last. The images kept are a seeded sample of each
    class; the test split stays balanced (`test`: a seeded sample of that many, default all of it).
    Returns train_x, train_y (int64), test_x, test_y and classes, for a tensors file."""
    labels, test_labels = np.asarray(labels).astype(np.int64), np.asarray(test_labels).astype(np.int64)
    k = len(classes)
    if not (isinstance(imbalance, (int, float)) and imbalance >= 1):
        raise ValueError(f"imbalance={imbalance!r}: must be a number >= 1 (the largest class over the smallest)")
    available = np.bincount(labels, minlength=k)
    head = int(available.min()) if head is None else _require_count("head", head)
    if head > available.min():
        raise ValueError(f"head={head}: the smallest class has {available.min()} training images")
    rng_train, rng_test = _streams(seed)
    keep = []
    for c in range(k):
        n = max(1, int(head * imbalance ** (-c / max(1, k - 1))))
        keep.append(rng_train.permutation(np.flatnonzero(labels == c))[:n])
    kept = np.sort(np.concatenate(keep))
    chosen = np.arange(len(test_labels)) if test is None else np.sort(
        rng_test.permutation(len(test_labels))[:_require_count("test", test)])
    return {"train_x": images[kept], "train_y": labels[kept], "test_x": test_images[chosen],
            "test_y": test_labels[chosen], "classes": np.array(list(classes))}
