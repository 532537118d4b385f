"""Small learnable image-classification data, written in each source's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.data.idx import write_idx


def pattern(label: int, h: int, w: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """(h, w, channels) uint8: noise, plus bright blocks in one of 4 horizontal bands (label % 4) in one of 3
    left-right symmetric column patterns (label // 4: centre, both sides, full width), tinted by the label.
    12 classes, learnable from grey levels alone, at any size, and unchanged by a left-right flip."""
    img = rng.integers(0, 70, (h, w, channels))
    band = slice((label % 4) * h // 4, (label % 4 + 1) * h // 4)
    third = w // 3
    columns = [slice(third, w - third)], [slice(0, third), slice(w - third, w)], [slice(0, w)]
    for cols in columns[(label // 4) % 3]:
        img[band, cols] += 170
        if channels == 3:
            img[band, cols, label % 3] += 15
    return img.clip(0, 255).astype(np.uint8)


def arrays(n: int, num_classes: int, h: int = 12, w: int = 12, channels: int = 3, seed: int = 0):
    """(n, h, w, channels) uint8 images and (n,) int64 labels, class i = i % num_classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    return np.stack([pattern(int(k), h, w, rng, channels) for k in labels]), labels.astype(np.int64)


def image_folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (16, 16),
                 seed: int = 0) -> Path:
    """root/<class>/<i>.png, RGB, all of one size."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(k, *size, rng)).save(root / name / f"{i}.png")
    return root


def mixed_folder(root: Path, classes: list[str], total: int, seed: int = 0) -> Path:
    """root/<class>/<i>.png or .jpg: `total` RGB images of the class patterns, shared out over the classes, in PNG
    and JPEG and three sizes (a user's first folder, as it comes)."""
    rng = np.random.default_rng(seed)
    sizes = [(24, 24), (32, 24), (20, 28)]
    for i in range(total):
        k = i % len(classes)
        (root / classes[k]).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pattern(k, *sizes[i % 3], rng))
        image.save(root / classes[k] / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def labelled_folder(root: Path, csv: Path, kind: str, n: int, size: tuple[int, int] = (12, 12), seed: int = 0) -> Path:
    """root/<a or b>/<i>.png, RGB, of the 12 patterns, and the CSV `csv` for dataset.labels: `kind` multi_hot
    (labels top, left, centre: the pattern's band and column bits) or values (angle: its band times 30)."""
    rng = np.random.default_rng(seed)
    names = ["top", "left", "centre"] if kind == "multi_hot" else ["angle"]
    rows = [",".join(["file", *names])]
    for i in range(n):
        k = i % 12
        rel = f"{'ab'[i % 2]}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern(k, *size, rng)).save(root / rel)
        values = [k % 4 == 0, k // 4 != 0, k // 4 != 1] if kind == "multi_hot" else [30.0 * (k % 4)]
        rows.append(",".join([rel, *(f"{float(v):g}" for v in values)]))
    csv.write_text("\n".join(rows) + "\n")
    return root


def idx_files(raw: Path, prefix: str, n_train: int, n_test: int, num_classes: int, seed: int = 0) -> None:
    """MNIST-layout IDX files `<prefix>train-images-idx3-ubyte`, ... (torchvision's names) of 28x28 grey images."""
    for split, n in (("train", n_train), ("t10k" if not prefix else "test", n_test)):
        x, y = arrays(n, num_classes, 28, 28, 1, seed + (split == "train"))
        write_idx(raw / f"{prefix}{split}-images-idx3-ubyte", torch.from_numpy(x[..., 0]))
        write_idx(raw / f"{prefix}{split}-labels-idx1-ubyte", torch.from_numpy(y.astype(np.uint8)))


def cifar10_batches(root: Path, per_batch: int, n_test: int) -> Path:
    """torchvision's CIFAR-10 layout: root/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, (name, n) in enumerate([(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]):
        x, y = arrays(n, 10, 32, 32, 3, seed=i)
        with open(folder / name, "wb") as f:  # CIFAR's format: rows of 3072 bytes, channel-major
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(n, -1), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return root


def with_one_pixel_changed(root: Path, dest: Path, split: str = "train") -> Path:
    """A copy of the MNIST-layout data under `root` at `dest` (its caches left out), the centre pixel of the first
    image of `split` (train or t10k) inverted: the same shapes and classes, other images."""
    import shutil

    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.cache.pt"))
    images = dest / "MNIST" / "raw" / f"{split}-images-idx3-ubyte"
    raw = bytearray(images.read_bytes())
    raw[16 + 14 * 28 + 14] ^= 0xFF  # after the 16-byte IDX header: row 14, column 14 of the first 28x28 image
    images.write_bytes(bytes(raw))
    return dest
