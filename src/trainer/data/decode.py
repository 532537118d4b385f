"""Decoding image files (or PIL images) of any size and mode into one uint8 (N, C, H, W) tensor.

Pillow releases the GIL while it decodes, so a thread per core decodes in parallel. Every image is
converted to the chosen channel count (grey `L` or `RGB`; an alpha channel is dropped) and resized
(bilinear, antialiased) to the chosen size. This runs once per dataset: the result is cached.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer.errors import UserError

log = logging.getLogger(__name__)

# Pillow modes without colour; every other mode (RGB, RGBA, P, CMYK, YCbCr, ...) counts as colour.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Modes of more than 8 bits per pixel, which Pillow's convert("L") clips to 0 and 255 instead of scaling.
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})

Opener = Callable[[int], Any]  # index -> a PIL image (opened lazily or decoded); raises on a bad file


def survey(count: int, open_image: Opener, name: Callable[[int], str]) -> tuple[Counter, bool]:
    """The (H, W) sizes found, with their counts, and whether any image has colour."""
    sizes: Counter = Counter()
    colour = False
    for i in range(count):
        with _readable(name(i)):
            img = open_image(i)
            sizes[(img.height, img.width)] += 1
            colour = colour or img.mode not in GREY_MODES
            _close(img)
    return sizes, colour


def choose_shape(sizes: Counter, colour: bool, image_size: Sequence[int] | None, channels: int | None,
                 where: str) -> tuple[int, int, int]:
    """(C, H, W) from the options, else the most common size and 3 channels if any image has colour."""
    if image_size is None:
        (h, w), n = sizes.most_common(1)[0]
        if len(sizes) > 1:
            log.info("%s: images come in %d sizes; resizing all to the most common, %dx%d (%d of %d images); set "
                     "dataset.image_size=[H,W] to choose", where, len(sizes), h, w, n, sum(sizes.values()))
    else:
        if not (isinstance(image_size, (list, tuple)) and len(image_size) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
            raise UserError(f"dataset.image_size={image_size!r}: must be [height, width] in pixels, or null (the "
                            "most common size)")
        h, w = image_size
    if channels not in (None, 1, 3):
        raise UserError(f"dataset.channels={channels!r}: must be 1 (grey), 3 (RGB) or null (3 if any image has "
                        "colour)")
    return (channels or (3 if colour else 1), h, w)


def decode(count: int, open_image: Opener, name: Callable[[int], str], shape: tuple[int, int, int],
           what: str, out: np.ndarray | None = None) -> torch.Tensor:
    """Every image as uint8 (count, C, H, W), converted and resized to `shape`, with a progress bar; into `out`
    (count, C, H, W) when given (an array mapped onto a file on disk: see ImageDataset.decode_target)."""
    from PIL import Image

    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    out = np.empty((count, c, h, w), dtype=np.uint8) if out is None else out

    def one(i: int) -> None:
        with _readable(name(i)):
            img = source = open_image(i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Palette images with Transparency ...": converted all the same
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                img = to_8bit(img, name(i)).convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            out[i] = np.asarray(img, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)  # Pillow's HWC -> CHW
            _close(source)

    with tqdm(total=count, desc=f"decoding {what}", unit="img", disable=not sys.stderr.isatty(),
              dynamic_ncols=True) as bar, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, count, 256):
            list(pool.map(one, range(start, min(count, start + 256))))
            bar.update(min(count, start + 256) - start)
    return torch.from_numpy(out)  # (N, C, H, W)


def to_8bit(img: Any, where: str) -> Any:
    """A 16-bit or floating-point grey image (Pillow modes I;16*, I, F) scaled to 8-bit grey (L); any other
    image as it is. Pillow's convert("L") would clip it: a 16-bit image holding 0..63000 became 0s and 255s.
    16-bit levels (and I, the 32-bit mode, holding 0..65535: 16-bit files decode to it) are scaled by
    255/65535; floats by 255 when they lie in 0..1, taken as 8-bit levels when they lie in 0..255. Other
    ranges have no one meaning: refused (UserError) rather than guessed."""
    if img.mode not in DEEP_MODES:
        return img
    from PIL import Image

    a = np.asarray(img)
    if img.mode == "F":
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all():  # min and max of an array holding NaN are NaN: name what is wrong instead
            bad = int((~np.isfinite(a)).sum())
            raise UserError(f"{where}: a floating-point image with {bad} value{'s' * (bad != 1)} that "
                            f"{'are' if bad != 1 else 'is'} not a number (NaN or infinite); those in 0-1 or 0-255 "
                            "are read")
        if low < 0 or high > 255:
            raise UserError(f"{where}: a floating-point image with values from {low:g} to {high:g}; those in 0-1 or "
                            "0-255 are read (convert it to 8 or 16 bits first)")
        levels = np.rint(a * np.float32(255 if high <= 1 else 1))
    else:
        low, high = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if low < 0 or high > 65535:
            raise UserError(f"{where}: a 32-bit integer image with values from {low} to {high}; 16-bit values "
                            "(0-65535) are read (convert it to 8 or 16 bits first)")
        levels = a.astype(np.uint32)  # in place from here: one copy of a large image, not four
        levels *= 255
        levels += 32767
        levels //= 65535  # v * 255 / 65535, rounded: 65535 -> 255, 32896 -> 128, 128 -> 0
    return Image.fromarray(levels.astype(np.uint8))  # 2-d uint8: mode L


class _readable:
    """Turn Pillow's errors for one image into a UserError that names the file."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        from PIL import Image, UnidentifiedImageError

        bad = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
        if error is not None and isinstance(error, bad):
            detail = " ".join(str(error).split())[:160]
            raise UserError(f"{self.name}: not a readable image ({type(error).__name__}: {detail})") from None
        return False


def _close(img: Any) -> None:
    close = getattr(img, "close", None)
    if close is not None:
        close()
