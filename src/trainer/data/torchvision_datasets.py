"""Any image-classification dataset of `torchvision.datasets`, by name, with torchvision's own download."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data.dataset import ImageDataset, Images
from trainer.data.decode import choose_shape, decode, survey
from trainer.errors import UserError, require_bool

log = logging.getLogger(__name__)

# The single-label classification datasets of torchvision.datasets (the others detect, segment, caption or
# compare images). Also what a checkpoint's dataset.name may name: nothing else is ever instantiated.
CLASSIFICATION = ("CIFAR10", "CIFAR100", "Caltech101", "Caltech256", "CLEVRClassification", "Country211", "DTD",
                  "EMNIST", "EuroSAT", "FER2013", "FGVCAircraft", "FashionMNIST", "Flowers102", "Food101", "GTSRB",
                  "ImageNet", "Imagenette", "KMNIST", "LFWPeople", "MNIST", "Omniglot", "OxfordIIITPet", "PCAM",
                  "Places365", "QMNIST", "RenderedSST2", "SEMEION", "STL10", "SUN397", "SVHN", "StanfordCars", "USPS")
SURVEYED = 1000  # images whose size and mode decide the defaults when a dataset has no array of them


class TorchvisionDataset(ImageDataset):
    """`torchvision.datasets.<name>(root/<name>, ...)`: its train split, and its test split where it has one.

    `split` is passed to datasets that take it as a subset (EMNIST's `balanced`, ...); for datasets whose
    `split` picks train or test, leave it null. `image_size` and `channels` as for image_folder (a dataset
    without one image size is surveyed on up to 1000 images to pick the defaults).
    """

    def __init__(self, *, name: str, root: str, download: bool, split: str | None, image_size: list[int] | None,
                 channels: int | None, **common: Any) -> None:
        if name not in CLASSIFICATION:
            import torchvision.datasets

            known = isinstance(getattr(torchvision.datasets, name, None), type)
            raise UserError(f"dataset.name={name}: " + ("not an image-classification dataset" if known else
                            "no such dataset in torchvision.datasets") +
                            f"; the classification datasets are {', '.join(CLASSIFICATION)}")
        # a folder per dataset: torchvision's layouts differ (MNIST/raw/, cifar-10-batches-py/, ...)
        self.name, self.root, self.split = name, Path(root).expanduser() / name, split
        self.download = require_bool("dataset.download", download)
        self.image_size, self.channels = image_size, channels
        super().__init__(**common)

    def prepare(self) -> None:
        self._open(train=True, download=self.download)

    def sources(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.endswith(".cache.pt"))

    def cache_options(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "image_size": self.image_size, "channels": self.channels}

    def read(self) -> Images:
        train = self._open(train=True)
        test = self._open(train=False)
        train_x, train_y = self._arrays(train)
        test_x, test_y = self._arrays(test) if test is not None else (None, None)
        if test_x is not None and tuple(test_x.shape[1:]) != tuple(train_x.shape[1:]):
            raise UserError(f"dataset.name={self.name}: its test images are {tuple(test_x.shape[1:])}, its training "
                            f"images {tuple(train_x.shape[1:])}; set dataset.image_size")
        top = max(int(train_y.max()), int(test_y.max()) if test_y is not None and len(test_y) else 0)
        classes = list(getattr(train, "classes", None) or [str(i) for i in range(top + 1)])
        return Images(train_x, train_y, classes, test_x, test_y)

    def _open(self, train: bool, download: bool = False) -> Any:
        """The dataset object of one split; None for the test split of a dataset without one."""
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.name)
        params = inspect.signature(cls.__init__).parameters
        takes_train = "train" in params or issubclass(cls, torchvision.datasets.MNIST)
        kwargs: dict[str, Any] = {"download": download} if "download" in params or takes_train else {}
        if self.split is not None:
            if "split" not in params:
                raise UserError(f"dataset.split={self.split}: torchvision.datasets.{self.name} takes no split")
            kwargs["split"] = self.split
        if takes_train:
            kwargs["train"] = train
        elif "split" in params and self.split is None:
            kwargs["split"] = "train" if train else "test"
        elif not train:
            return None  # no test split: ImageDataset holds dataset.test_size images out of train
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            return cls(str(self.root), **kwargs)
        except ValueError as e:
            if not train and kwargs.get("split") == "test":
                return None  # a dataset whose split has no "test" (ImageNet: train, val)
            raise UserError(f"dataset.name={self.name}: {' '.join(str(e).split())[:200]}") from None
        except (RuntimeError, OSError) as e:
            hint = "" if self.download else " (dataset.download=false)"
            raise UserError(f"dataset.name={self.name}: not found or not complete under {self.root}{hint}, and "
                            f"torchvision could not provide it: {' '.join(str(e).split())[:200]}") from None

    def _arrays(self, ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) uint8 images and (N,) labels: from the dataset's arrays when it keeps them in memory at the
        wanted size, else by decoding each item."""
        data, labels = getattr(ds, "data", None), getattr(ds, "targets", getattr(ds, "labels", None))
        if isinstance(data, (np.ndarray, torch.Tensor)) and labels is not None and self.image_size is None \
                and self.channels is None and torch.as_tensor(data).dtype == torch.uint8:
            return torch.as_tensor(data), torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        n = len(ds)
        step = max(1, n // SURVEYED)
        picked = list(range(0, n, step))
        sizes, colour = survey(len(picked), lambda i: ds[picked[i]][0], lambda i: f"{self.name}[{picked[i]}]")
        shape = choose_shape(sizes, colour, self.image_size, self.channels, self.name)
        targets = [0] * n

        def item(i: int) -> Any:
            image, target = ds[i]
            if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
                raise UserError(f"dataset.name={self.name}: item {i} has the target {target!r}, not a class index")
            targets[i] = int(target)
            return image

        images = decode(n, item, lambda i: f"{self.name}[{i}]", shape, self.name)
        return images, torch.tensor(targets, dtype=torch.int64)
