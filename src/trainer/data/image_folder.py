"""The user's own folder of images, one sub-folder per class."""

from __future__ import annotations

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
    - `path/train/<class>/...` and `path/test/<class>/...`, optionally `path/val/<class>/...`.

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

    def sources(self) -> list[Path]:
        return [f for files, _ in self._splits.values() for f in files]

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

    def _scan(self) -> dict[str, tuple[list[Path], list[int]]]:
        """{split: (image files, class indices)} in a fixed order; raises UserError for an unusable folder."""
        if not self.path.is_dir():
            raise UserError(f"dataset.path={self.path}: not a directory (give a folder of class folders of images)")
        split_layout = (self.path / "train").is_dir() and (self.path / "test").is_dir()
        roots = {s: self.path / s for s in SPLIT_DIRS if (self.path / s).is_dir()} if split_layout else {
            "train": self.path}
        self._classes = _class_dirs(roots["train"])
        splits = {}
        for split, root in roots.items():
            extra = sorted(set(_class_dirs(root, required=False)) - set(self._classes))
            if extra:
                raise UserError(f"{root}: class folder {extra[0]!r} is not among the training classes in "
                                f"{roots['train']} ({', '.join(self._classes)})")
            files, labels = [], []
            for label, name in enumerate(self._classes):
                found = _images_in(root / name) if (root / name).is_dir() else []
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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _open(path: Path) -> Any:
    from PIL import Image

    return Image.open(path)
