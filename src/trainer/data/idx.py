"""The IDX format of MNIST-style files: header checks with clear errors, and a writer.

Parsing itself is torchvision's (`torchvision.datasets.MNIST` reads the files); this module makes
sure a file is a complete, well-formed IDX file first, because torchvision's bare `assert`s do not
say which file is broken or how.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from trainer.errors import UserError

UINT8 = 0x08


def check_idx(path: Path, ndim: int) -> tuple[int, ...]:
    """Return the shape of the uint8 IDX file at `path`, or raise UserError naming what is wrong."""
    size = path.stat().st_size
    header_size = 4 + 4 * ndim
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < 4 or header[0] != 0 or header[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number {header[:4].hex() or 'empty'}); "
                        "delete it and provision the data again")
    if header[2] != UINT8 or header[3] != ndim:
        raise UserError(f"{path}: IDX header says type 0x{header[2]:02x} with {header[3]} dimensions, "
                        f"expected uint8 (0x08) with {ndim}")
    if len(header) < header_size:
        raise UserError(f"{path}: truncated IDX header ({size} bytes)")
    shape = struct.unpack(f">{ndim}I", header[4:])
    expected = header_size + math.prod(shape)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise UserError(f"{path}: {what}: {size} bytes, the header {list(shape)} needs {expected}")
    return shape


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (used to provision data and to make test fixtures)."""
    from trainer.run.files import atomic_write

    data = tensor.to(torch.uint8).contiguous()
    header = bytes([0, 0, UINT8, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with atomic_write(path) as f:
        f.write(header)
        f.write(data.numpy().tobytes())
