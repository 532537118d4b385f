"""What a file from elsewhere may make this process allocate, checked before anything of that size exists.

A checkpoint may come from a stranger, and a few kilobytes can declare terabytes: a zip record that inflates
to any size, a tensor that is a view of billions of elements over one stored element, weights for a model of
a billion units. Each check here reads only what the file declares (its zip directory, tensor shapes and
strides, the sizes a model would have) and raises UserError in one line, so a refusal costs seconds and a
bounded amount of memory, whatever the content (docs/checkpoints.md "Checkpoints from elsewhere").
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.runtime import available_memory_bytes, size_text

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
# Image elements (C*H*W) of a stored input shape a model is rebuilt for (eval, predict, export): 4096x4096 grey,
# 2364x2364 RGB. A model's trial forward pass on a larger image could take all memory: a ResNet's first activation
# alone has 64 channels at half the image's height and width.
MAX_IMAGE_ELEMENTS = 2**24
# Containers inside containers: a checkpoint nests about 5 deep (optimizer state, per parameter, per moment), and
# Python's recursion limit (1000) is what a deeper structure would meet in YAML's composer or any recursive walk.
MAX_NESTING = 64
# The pickle of a checkpoint (its data.pkl: the config text, class names, counters and the tensors' references; the
# tensors' bytes are records of their own) is a few hundred KiB. Unpickled, each byte can become tens of bytes of
# Python objects (2 million class names: 30 MB of pickle, 400 MiB in memory), so it is bounded before it is read.
MAX_PICKLE_BYTES = 8 << 20


def require_memory(nbytes: int, what: str, hint: str) -> None:
    """Raise UserError unless `nbytes` fit in the memory available to this process (see available_memory_bytes);
    `what` needs them, `hint` says what to do instead."""
    available = available_memory_bytes()
    if nbytes > available:
        raise UserError(f"{what} needs {size_text(nbytes)}, more than the {size_text(available)} of memory "
                        f"available here; {hint}")


def check_zip_records(path: Path) -> None:
    """Refuse a file that `torch.load` would read into more memory than its own size.

    torch.save writes a zip archive of stored (uncompressed) records. A deflated record would be inflated whole
    (7.4 MB became 7 GiB), and a file that is not a zip archive is read in torch's legacy format, which allocates
    each storage at the size its pickle declares before reading it. The zip's central directory gives every
    record's method and sizes without reading the records."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UserError(f"{path} is not a readable checkpoint (not a zip archive, which torch.save writes; truncated "
                        "or not a torch file)") from None
    total = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            raise UserError(f"refusing {path}: its record {record.filename!r} is compressed ({record.file_size} bytes "
                            f"stored in {record.compress_size}); torch.save stores records uncompressed, and a "
                            "compressed one could inflate to any size")
        if record.filename.rpartition("/")[2] == "data.pkl" and record.file_size > MAX_PICKLE_BYTES:
            raise UserError(f"refusing {path}: its pickle ({record.filename!r}) is {size_text(record.file_size)}; a "
                            f"checkpoint's is at most {size_text(MAX_PICKLE_BYTES)} (its tensors are records of their "
                            "own)")
        total += record.file_size
    size = path.stat().st_size
    if total > size:
        raise UserError(f"refusing {path}: its records declare {total} bytes, more than the file's own {size}")


def check_loaded(value: object, path: Path) -> None:
    """Refuse a loaded checkpoint holding a tensor that is more than its storage, or containers nested deeper
    than MAX_NESTING.

    `torch.load(weights_only=True)` rebuilds a tensor from a storage, a shape and strides: a stride of 0 makes
    a 2x10^9-element view of one stored byte, which any copy (`set_rng_state`, `load_state_dict`) materialises.
    A tensor whose elements fit in its storage costs at most the file's size. Walked with a stack, not recursion:
    the pickle may nest lists thousands deep."""
    stack: list[tuple[object, str, int]] = [(value, "", 0)]
    while stack:
        item, key, depth = stack.pop()
        if depth > MAX_NESTING:
            raise UserError(f"refusing {path}: its {key or 'content'} nests containers deeper than {MAX_NESTING} "
                            "levels")
        if isinstance(item, torch.Tensor):
            _check_tensor(item, key, path)
        elif isinstance(item, dict):
            stack.extend((v, f"{key}.{k}" if key else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(item))


def _check_tensor(tensor: torch.Tensor, key: str, path: Path) -> None:
    if tensor.layout != torch.strided:  # a sparse tensor declares its dense size: to_dense() would allocate it
        raise UserError(f"refusing {path}: its tensor {key} is {tensor.layout}, not a dense tensor")
    stored = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > stored:
        raise UserError(f"refusing {path}: its tensor {key} of shape {tuple(tensor.shape)} is a view of "
                        f"{tensor.numel()} elements over {stored} stored bytes (strides {tensor.stride()}); this code "
                        "writes every tensor with its own elements")
