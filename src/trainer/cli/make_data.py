"""Write a generated dataset for a task other than classification as a tensors file (`dataset=tensors`).

    counts    32x32 images of 0..15 small discs and squares; label: how many (float32, Poisson-distributed)
    mosaic    56x56 2x2 grids of MNIST digits, some cells blank; label: which digits appear (10-way multi-hot uint8)
    rotation  28x28 MNIST digits turned by up to +-45 degrees; label: the angle in degrees (float32)
    longtail  FashionMNIST with class c keeping 6000 * 100**(-c/9) training images (6000 T-shirts down to 60 ankle
              boots, --imbalance sets the ratio; --train the largest class's count); the test split stays balanced

mosaic and rotation read MNIST's IDX files from <--mnist-root>/MNIST/raw/ (longtail: FashionMNIST's, from
FashionMNIST/raw/), provisioned there first if they are missing, as train.py provisions them (`htt-data MNIST`).
The same arguments write the same bytes (src/trainer/data/generated.py makes the arrays). The file is written
whole or not at all, and the command prints one line: the file, its size and the labels' statistics.

    htt-make-data counts                                   # data/tasks/counts.npz
    htt-make-data mosaic --seed 1 --out other/mosaic.npz
    htt-make-data rotation --train 1000 --test 200 --mnist-root /mnt/data
    htt-make-data longtail --imbalance 100                 # data/tasks/longtail.npz
    python scripts/make_task_data.py counts                # the same in a checkout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from trainer.data import FashionMNIST, generated
from trainer.data.idx import check_idx
from trainer.data.provision import FILES, provision, raw_dir
from trainer.errors import UserError, error_line
from trainer.run.files import atomic_write
from trainer.system import size_text

DEFAULTS = {"counts": (20000, 4000), "mosaic": (30000, 5000), "rotation": (30000, 5000), "longtail": (6000, 10000)}


def read_mnist(root: Path, name: str = "MNIST") -> dict[str, np.ndarray]:
    """MNIST's four IDX files under `root`/MNIST/raw/ (or FashionMNIST's, `name`), as train_x (60000, 28, 28) uint8,
    train_y (60000,) uint8, test_x and test_y; UserError naming the file that is missing or broken."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--mnist-root={root}: is a file, not a folder ({name} is read from <root>/{name}/raw/)")
    if not all((raw_dir(root, name) / file).is_file() for file in FILES):
        provision(name, root, download=True, mirror=None)  # as train.py gets them: files, download, registry
    raw = raw_dir(root, name)
    arrays = {}
    for name, key in zip(FILES, ("train_x", "train_y", "test_x", "test_y")):
        path = raw / name
        if not path.is_file():
            raise UserError(f"--mnist-root={root}: no {path} (get {name} with `htt-data {name} --root {root}`)")
        ndim = 3 if "images" in name else 1
        shape = check_idx(path, ndim)  # a clear error for a truncated or foreign file, before numpy reads it
        arrays[key] = np.fromfile(path, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]) or arrays[f"{split}_x"].shape[1:] != (28, 28):
            raise UserError(f"{raw}: the {split} split has images {arrays[f'{split}_x'].shape} and labels "
                            f"{arrays[f'{split}_y'].shape}; {name}'s are (N, 28, 28) and (N,)")
        if arrays[f"{split}_y"].max() > 9:
            raise UserError(f"{raw}: the {split} labels go up to {arrays[f'{split}_y'].max()}; {name}'s are 0..9")
    return arrays


def generate(task: str, seed: int, train: int, test: int, mnist: dict[str, np.ndarray] | None,
             imbalance: float = 100.0) -> dict:
    """The arrays of `task`'s tensors file; `mnist` (read_mnist's arrays) for mosaic, rotation and longtail."""
    if task == "counts":
        return generated.counts(seed=seed, train=train, test=test)
    if task == "longtail":
        return generated.long_tailed(mnist["train_x"], mnist["train_y"], mnist["test_x"], mnist["test_y"],
                                     list(FashionMNIST.class_names), seed=seed, imbalance=imbalance, head=train,
                                     test=test)
    if task == "mosaic":
        return generated.mosaic(mnist["train_x"], mnist["train_y"], mnist["test_x"], mnist["test_y"], seed=seed,
                                train=train, test=test)
    return generated.rotation(mnist["train_x"], mnist["test_x"], seed=seed, train=train, test=test)


def label_stats(task: str, arrays: dict[str, np.ndarray]) -> str:
    """The labels in a few numbers, train then test."""
    parts = []
    for split in ("train", "test"):
        y = arrays[f"{split}_y"]
        if task == "counts":
            parts.append(f"{split} count mean {y.mean():.2f}, sd {y.std():.2f}, range {y.min():.0f}..{y.max():.0f}")
        elif task == "longtail":
            counts = np.bincount(y, minlength=10)
            parts.append(f"{split} per class {counts.max()}..{counts.min()} (ratio {counts.max() / counts.min():.0f})")
        elif task == "mosaic":
            per_image = y.sum(axis=1)
            parts.append(f"{split} {per_image.mean():.2f} labels per image ({per_image.min()}..{per_image.max()}), "
                         f"digit frequency {y.mean(axis=0).min():.2f}..{y.mean(axis=0).max():.2f}")
        else:
            parts.append(f"{split} angle {y.min():+.1f}..{y.max():+.1f} deg, mean {y.mean():+.2f}, "
                         f"mean |angle| {np.abs(y).mean():.1f}")
    return "; ".join(parts)


def check_out(out: Path) -> None:
    """Refuse an --out that cannot be a tensors file before any work is done (an unwritable folder is refused
    by atomic_write, which opens its temporary file before the data is generated)."""
    if out.suffix.lower() != ".npz":
        raise UserError(f"--out={out}: must end in .npz (the tensors dataset reads .npz files)")
    if out.is_dir():
        raise UserError(f"--out={out}: is a folder; give the path of the .npz file to write")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out={out}: {existing} is a file, not a folder")


def make(task: str, out: Path, seed: int, train: int | None, test: int | None, mnist_root: Path,  # noqa: PLR0913
         imbalance: float = 100.0) -> str:
    """Generate `task`'s dataset into `out`; return the line to print."""
    train = DEFAULTS[task][0] if train is None else train
    test = DEFAULTS[task][1] if test is None else test
    for name, value, low in (("--seed", seed, 0), ("--train", train, 1), ("--test", test, 1)):
        if value < low:
            raise UserError(f"{name}={value}: must be an integer >= {low}")
    if task == "longtail" and (train > 6000 or test > 10000 or not imbalance >= 1):
        raise UserError(f"longtail: --train={train} (at most 6000: the largest class), --test={test} (at most "
                        f"10000), --imbalance={imbalance} (>= 1)")
    check_out(out)
    mnist = None if task == "counts" else read_mnist(mnist_root, "FashionMNIST" if task == "longtail" else "MNIST")
    with atomic_write(out) as f:  # its temporary file first: an unwritable --out fails before the work
        arrays = generate(task, seed, train, test, mnist, imbalance)
        np.savez(f, **arrays)
    x, y = arrays["train_x"], arrays["train_y"]
    label_shape = f"(N, {y.shape[1]})" if y.ndim == 2 else "(N,)"
    return (f"wrote {out} ({size_text(out.stat().st_size)}): {task}, seed {seed}, {len(x)} train + "
            f"{len(arrays['test_x'])} test images {x.shape[1]}x{x.shape[2]} uint8, labels {y.dtype} {label_shape}; "
            f"{label_stats(task, arrays)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(DEFAULTS), help="the dataset to write")
    parser.add_argument("--out", type=Path, help="the .npz file to write (default: data/tasks/<task>.npz in the "
                                                 "current folder)")
    parser.add_argument("--seed", type=int, default=0, help="the random seed (default: 0)")
    parser.add_argument("--train", type=int, help="training images (default: " +
                        ", ".join(f"{t} {n}" for t, (n, _) in DEFAULTS.items()) + ")")
    parser.add_argument("--test", type=int, help="test images (default: " +
                        ", ".join(f"{t} {n}" for t, (_, n) in DEFAULTS.items()) + ")")
    parser.add_argument("--imbalance", type=float, default=100.0, help="longtail: the largest class's training "
                        "images over the smallest's (default: 100)")
    parser.add_argument("--mnist-root", type=Path, default=Path("data"),
                        help="the folder holding MNIST/raw/, as dataset.root (default: data/ in the current folder)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path("data") / "tasks" / f"{args.task}.npz"
    try:
        print(make(args.task, out, args.seed, args.train, args.test, args.mnist_root, args.imbalance), flush=True)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The command (`htt-make-data`, `python scripts/make_task_data.py`)."""
    sys.exit(main())
