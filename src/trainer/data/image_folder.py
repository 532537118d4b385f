"""The user's own folder of images, one sub-folder per class."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from trainer.data.dataset import ImageDataset, Images
from trainer.data.decode import SUFFIXES, choose_shape, decode, survey
from trainer.errors import UserError

SPLIT_DIRS = ("train", "val", "test")


class ImageFolder(ImageDataset):
    """Images in `path`, in one of two layouts:

    - `path/<class>/*.png|jpg|...`: the test and validation splits are held out by `split_seed`;
    - `path/train/<class>/...` with `path/test/<class>/...` or `path/val/<class>/...` or both; a split without
      its folder is held out from train/.

    Class names are the class folders' names, sorted. Any size and mode: every image is converted to
    `channels` (1 or 3; null: 3 if any image has colour) and resized to `image_size` ([H, W]; null: the
    most common size).
    """

    def __init__(self, *, path: str, image_size: list[int] | None, channels: int | None, **common: Any) -> None:
        self.path = Path(path).expanduser()
        self.image_size, self.channels = image_size, channels
        self.name = self.path.name or "ImageFolder"
        self._splits = self._scan()
        super().__init__(**common)

    def sources(self) -> list[str]:  # paths as strings: 50,000 Path objects would cost a tenth of a second
        return [f for files, _ in self._splits.values() for f in files]

    def cache_dir(self, files: list[str]) -> Path:
        return self.path

    def stamp(self, files: list[str]) -> str:
        return hashlib.sha256("\n".join(self._stats).encode()).hexdigest()  # made by _scan: one stat per file

    def cache_options(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "image_size": self.image_size, "channels": self.channels}

    def read(self) -> Images:
        files = self.sources()
        sizes, colour = survey(len(files), lambda i: _open(files[i]), lambda i: str(files[i]))
        shape = choose_shape(sizes, colour, self.image_size, self.channels, str(self.path))
        self.require_memory(len(files) * shape[0] * shape[1] * shape[2])
        images = decode(len(files), lambda i: _open(files[i]), lambda i: str(files[i]), shape, str(self.path))
        out: dict[str, torch.Tensor] = {}
        start = 0
        for split, (split_files, labels) in self._splits.items():
            out[f"{split}_x"], out[f"{split}_y"] = images[start:start + len(split_files)], torch.tensor(labels)
            start += len(split_files)
        return Images(classes=self._classes, **out)

    def _scan(self) -> dict[str, tuple[list[str], list[int]]]:
        """{split: (image files, class indices)} in a fixed order; raises UserError for an unusable folder."""
        if not self.path.is_dir():
            raise UserError(f"dataset.path={self.path}: not a directory (give a folder of class folders of images)")
        # train/ beside test/ or val/ (or both) is the split layout; a split it lacks is held out from train/
        split_layout = (self.path / "train").is_dir() and any((self.path / s).is_dir() for s in ("val", "test"))
        roots = {s: self.path / s for s in SPLIT_DIRS if (self.path / s).is_dir()} if split_layout else {
            "train": self.path}
        self._classes = _class_dirs(roots["train"])
        splits, self._stats = {}, []
        for split, root in roots.items():
            extra = sorted(set(_class_dirs(root, required=False)) - set(self._classes))
            if extra:
                raise UserError(f"{root}: class folder {extra[0]!r} is not among the training classes in "
                                f"{roots['train']} ({', '.join(self._classes)})")
            files, labels = [], []
            for label, name in enumerate(self._classes):
                found = _images_in(root / name, self._stats) if (root / name).is_dir() else []
                if not found and split == "train":
                    raise UserError(f"{root / name}: no images (class folders hold .png, .jpg, ... files: "
                                    f"{', '.join(sorted(SUFFIXES))})")
                files += found
                labels += [label] * len(found)
            if not files:
                raise UserError(f"{root}: no images in its class folders")
            splits[split] = (files, labels)
        return splits


def _class_dirs(root: Path, required: bool = True) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not names:
        raise UserError(f"{root}: no class folders in it (the layout is {root}/<class>/<image files>)")
    return names


def _images_in(folder: Path, stats: list[str]) -> list[str]:
    """The image files under `folder` (recursively, skipping hidden names), sorted; appends "path size mtime" of
    each to `stats`. os.scandir, not Path.rglob: a folder of 50,000 images is listed in a fraction of a second.
    A symlinked folder leading back into one already listed (a loop) is refused, naming the link: followed, it
    would list the same images again and again until the kernel stops it (ELOOP) with no path in its message."""
    found = []
    pending = [str(folder)]
    seen: set[tuple[int, int]] = set()
    while pending:
        current = pending.pop()
        try:
            st = os.stat(current)
            if (st.st_dev, st.st_ino) in seen:
                raise UserError(f"{current}: a symbolic link back to a folder already read (a loop); remove it "
                                f"or point it elsewhere")
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() in SUFFIXES and entry.is_file():
                        st = entry.stat()
                        found.append((entry.path, f"{entry.path} {st.st_size} {st.st_mtime_ns}"))
        except OSError as e:
            raise UserError(f"{e.filename or current}: cannot list it ({e.strerror or e})") from None
    found.sort()
    stats += [stat for _, stat in found]
    return [path for path, _ in found]


def _open(path: Path) -> Any:
    from PIL import Image

    return Image.open(path)
