"""Datasets: every source materialised into uint8 tensors, batched on the device (see dataset.py, batches.py).

The config options name these classes (`_target_: trainer.data.MNIST`); a user's own dataset class
subclasses `ImageDataset` and returns `Images` from `read()`.
"""

from trainer.data.batches import (
           Batch,
           BatchLoader,
           BatchTransform,
           epoch_seed,
           random_crop,
           random_hflip,
           random_shift,
)
from trainer.data.dataset import ImageDataset, Images
from trainer.data.image_folder import ImageFolder
from trainer.data.mnist import MNIST, FashionMNIST, IDXImageDataset
from trainer.data.tensors import TensorsFile
from trainer.data.torchvision_datasets import TorchvisionDataset

__all__ = ["Batch", "BatchLoader", "BatchTransform", "FashionMNIST", "IDXImageDataset", "ImageDataset", "ImageFolder",
           "Images", "MNIST", "TensorsFile", "TorchvisionDataset", "epoch_seed", "random_crop", "random_hflip",
           "random_shift"]
