"""Classify image files with a trained checkpoint.

    htt-predict outputs/<date>/<time>/checkpoints/best.pt digit.png scan.jpg --top 3
    python scripts/predict.py ...            # the same in a checkout

The model and the dataset's classes, image shape and normalisation come from the checkpoint. Each image
(PNG, JPEG or anything Pillow reads, any size, colour or grey) is converted the way the training images
were made. For a model of MNIST or Fashion-MNIST: grey levels, light content on a dark background (images
whose border is light, such as dark ink on paper, are inverted), cropped to its content, scaled to fit a
20x20 box (MNIST's own size normalisation; 28x28 for Fashion-MNIST, whose objects fill the frame) and placed
with its centre of mass at the centre of the 28x28 frame. For any other data: converted to the training
images' channels (grey or RGB) and resized to their size, as the dataset itself was decoded.
Prints, per file, the predicted class index, its name and its probability; for the other tasks (docs/tasks.md)
every label over the threshold (multilabel), the predicted values (regression) or the nearest classes with their
distances (embedding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.cli import checkpoint_arguments, require_dirs
from trainer.cli.config import model_from_checkpoint
from trainer.data import BatchTransform
from trainer.data.decode import decode, to_8bit
from trainer.data.tta import check_tta, with_tta
from trainer.errors import UserError, error_line
from trainer.tasks import Task

# Datasets made MNIST's way (centred grey content on black), and those of them whose objects fill the frame.
MNIST_STYLE = ("MNIST", "FashionMNIST")
FULL_FRAME = ("FashionMNIST",)


def to_training_format(path: Path, shape: tuple[int, int, int], box: int) -> torch.Tensor:
    """One image file as a (C, H, W) uint8 tensor made like the training images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = torch.from_numpy(np.array(to_8bit(img, str(path)).convert("L"), dtype=np.uint8))  # (h, w)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError (more than twice Image.MAX_IMAGE_PIXELS) is raised by Image.open itself, from the
        # size the header declares: nothing was decoded
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                        ) from None
    border = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).float()
    if border.mean() > 127:  # light background: invert to the training images' light-on-dark
        grey = 255 - grey
    rows, cols = (grey > 32).nonzero(as_tuple=True)
    if len(rows):  # crop to the content
        grey = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = grey.shape
    scale = box / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    fitted = F.interpolate(grey[None, None].float(), size=size, mode="bilinear", antialias=True,
                           align_corners=False)[0, 0]  # (h', w')
    c, height, width = shape
    # centre the content's centre of mass in the frame, as MNIST was made (kept inside the frame)
    mass = fitted.sum().clamp(min=1e-6)
    com_y = (fitted.sum(dim=1) * torch.arange(size[0])).sum() / mass
    com_x = (fitted.sum(dim=0) * torch.arange(size[1])).sum() / mass
    top = int((height / 2 - com_y).round().clamp(0, height - size[0]))
    left = int((width / 2 - com_x).round().clamp(0, width - size[1]))
    canvas = torch.zeros(height, width)
    canvas[top:top + size[0], left:left + size[1]] = fitted
    return canvas.round().clamp(0, 255).to(torch.uint8).expand(c, height, width)  # (C, H, W)


def predict(ckpt: str, files: list[Path], top: int, trust: bool = False, config_dirs: Sequence[Path] = (),
            tta: Sequence[str] = ()) -> list[list[tuple[int, str, float]]]:
    """Per file, what the checkpoint's task predicts: see predict_with_task."""
    return predict_with_task(ckpt, files, top, trust, config_dirs, tta)[1]


def predict_with_task(ckpt: str, files: list[Path], top: int, trust: bool = False, config_dirs: Sequence[Path] = (),
                      tta: Sequence[str] = ()) -> tuple[Task, list[list[tuple[int, str, float]]]]:
    """Per file, what the checkpoint's task predicts, as (index, name, value): for classification the `top`
    classes with their probabilities, most likely first; multi-label, every label whose probability reaches the
    threshold; regression, each column's value in the targets' units; embedding, the `top` nearest classes
    (by the distance to each class's mean embedding), nearest first.
    `trust`: rebuild the model from the checkpoint's own config; `config_dirs`: the user's options (see
    trainer.cli.config.rebuildable_config); `tta`: test-time augmentation's views (trainer.data.tta), whose
    softmax is averaged."""
    check_tta(list(tta))  # an unknown name before the checkpoint is read
    for path in files:  # a FIFO or a device would be read without end (predict waited forever on a FIFO)
        if not Path(path).is_file():
            raise UserError(f"{path}: not a regular file" + (" (it does not exist)" if not Path(path).exists() else
                                                            "; only image files are read, never FIFOs or devices"))
    restored = model_from_checkpoint(ckpt, trust=trust, config_dirs=config_dirs)
    data = restored.data
    shape, normalise = tuple(data["in_shape"]), BatchTransform(data["mean"], data["std"])
    if data["name"] in MNIST_STYLE:
        box = shape[1] if data["name"] in FULL_FRAME else round(shape[1] * 20 / 28)
        images = torch.stack([to_training_format(f, shape, box) for f in files])  # (N, C, H, W) uint8
    else:
        images = decode(len(files), lambda i: Image.open(files[i]), lambda i: str(files[i]), shape, "images")
    trained = restored.config.dataset
    model = with_tta(restored.model, list(tta), augment_shift=trained.augment_shift, random_crop=trained.random_crop,
                     mean=data["mean"], std=data["std"], task=restored.task.name)
    with torch.inference_mode():
        outputs = model(normalise(images))  # (N, width)
    return restored.task, restored.task.predictions(outputs, data["classes"], top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoint_arguments(parser)
    parser.add_argument("images", nargs="+", type=Path, help="image files: PNG, JPEG or anything Pillow reads")
    parser.add_argument("--top", type=int, default=1, help="how many classes to show per image")
    parser.add_argument("--tta", default="", help="test-time augmentation: views whose softmax is averaged, "
                        "comma-separated: hflip, shift (hflip,shift: 6 views); off by default (wrong for digits)")
    args = parser.parse_args()
    try:
        if args.top < 1:
            raise UserError(f"--top={args.top}: must be >= 1")
        task, results = predict_with_task(args.ckpt, args.images, args.top, args.trust_checkpoint,
                                          require_dirs(args.config_dir), [v for v in args.tta.split(",") if v])
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    for path, ranked in zip(args.images, results):
        print(f"{path}  " + ("  ".join(f"{i} {name!r} {task.value_text(v)}" for i, name, v in ranked) or
                             f"no label reaches {getattr(task, 'threshold', 0.5):.0%}"))
    return 0


def run() -> None:
    """The command (`htt-predict`, `python scripts/predict.py`), once trainer.cli.entry has prepared the process."""
    sys.exit(main())
