"""Reading files from elsewhere: each is refused within seconds and a bounded amount of memory, whatever it holds.

Run directories, datasets and their caches get copied in from other machines and other people. What a file
*declares* (its type, its size, a zip member's inflated size, an array header's shape, a tensor's strides) is
checked against a bound before anything that size is allocated: a few-kilobyte file must not be able to make a
command read forever (a FIFO, a link to /dev/zero) or allocate gigabytes (YAML aliases, a zip bomb, a
zero-stride view) before it is refused in one line. Checkpoints are read the same way (checkpoint.py), and a
model a checkpoint describes is sized against the memory available before it is built (config.py).
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from trainer.errors import MAX_DEPTH, UserError

MAX_TEXT_BYTES = 4 * 2**20  # a run directory's metrics.json, overrides.yaml or config.yaml is a few KiB
# A zip member inflating more than this many times its stored size, past MIN_BOMB_BYTES, is refused: deflate
# gets image arrays down 2-10 times; 1000 times is a file of zeros made to fill memory.
MAX_INFLATION = 100
MIN_BOMB_BYTES = 16 * 2**20
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
# Image elements (C*H*W) of a stored input shape a model is rebuilt for (eval, predict, export): 4096x4096 grey,
# 2364x2364 RGB. A model's trial forward pass on a larger image could take all memory: a ResNet's first activation
# alone has 64 channels at half the image's height and width.
MAX_IMAGE_ELEMENTS = 2**24
# The pickle of a torch.save file (its data.pkl: a checkpoint's config text, class names, counters and the
# tensors' references; the tensors' bytes are records of their own) is a few hundred KiB. Unpickled, each byte can
# become tens of bytes of Python objects (2 million class names: 30 MB of pickle, 400 MiB in memory).
MAX_PICKLE_BYTES = 8 << 20
# Values (tensors, numbers, strings, containers) in a torch.save file, counting each reference: a checkpoint holds a
# few thousand (its state dicts) and at most one per class name; a tensors dataset file, a few.
MAX_VALUES = 2 * MAX_CLASSES + 1_000_000

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character "
          "device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO (named pipe)", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular(path: str | os.PathLike, cap: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of `path` if it is a regular file (a symlink to one is followed) of at most `cap` bytes, else
    UserError. Opened without blocking: a FIFO is refused at once instead of waiting for a writer forever,
    and a link to /dev/zero is refused instead of read without end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # before fdopen, which raises its own error for a directory
        os.close(fd)
        raise UserError(f"{path}: is {file_kind(mode)}, not a regular file; only regular files are read")
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)  # the size it says, and what it holds: the file may grow as it is read
    if len(data) > cap:
        raise UserError(f"{path}: larger than the {cap // 2**20} MiB such a file may be")
    return data


def _text(path: str | os.PathLike, cap: int) -> str:
    try:
        return read_regular(path, cap).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_json(path: str | os.PathLike, cap: int = MAX_TEXT_BYTES) -> Any:
    """The JSON value in `path`, read as `read_regular` reads; UserError naming the file if it is not JSON."""
    try:
        return json.loads(_text(path, cap))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None


# PyYAML's safe loader, in C (libyaml) where PyYAML was built with it: the same plain values, about 10 times
# faster than the Python one (summarize.py reads each run's .hydra files: 20 ms a run in Python, measured)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_hazard(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """What would make parsing `text` costly, in words ("uses a YAML alias (*a)", "nests deeper than 32
    levels"), or None; read from the parser's events, before any structure is built. An alias lets 300 KB expand
    into gigabytes ("billion laughs"); nesting thousands deep exhausts the recursion of YAML's composer and of
    every walk after it. Neither Hydra nor OmegaConf writes either."""
    try:
        return _hazard(text, max_depth, SAFE_LOADER)
    except yaml.YAMLError:  # libyaml stops at 1000 levels of nesting on its own: say what the Python parser finds
        return _hazard(text, max_depth, yaml.SafeLoader)


def _hazard(text: str, max_depth: int, loader: type) -> str | None:
    depth = 0
    for event in yaml.parse(text, Loader=loader):  # events, one at a time: nothing is built yet
        if isinstance(event, yaml.AliasEvent):
            return f"uses a YAML alias (*{event.anchor})"
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > max_depth:
            return f"nests deeper than {max_depth} levels"
    return None


def parse_yaml(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """`text` as plain YAML values (no tags), refused (UserError naming `where`) if `yaml_hazard` finds one."""
    try:
        hazard = yaml_hazard(text, max_depth)
        if hazard:
            raise UserError(f"{where}: {hazard}; files of this project never do")
        return yaml.load(text, Loader=SAFE_LOADER)  # noqa: S506 (the safe loader: plain values, no tags)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(e).split())[:120]})") from None


def load_yaml(path: str | os.PathLike, cap: int = MAX_TEXT_BYTES) -> Any:
    """The YAML in `path`, read as `read_regular` reads and parsed as `parse_yaml` parses."""
    return parse_yaml(_text(path, cap), str(path))


def zip_members(path: Path, budget: int, *, stored_only: bool = False, what: str = "zip file") -> list[zipfile.ZipInfo]:
    """The members of the zip file `path` (.npz, .pt), refused (UserError) before anything is inflated if, as its
    directory declares them, they add up to more than `budget` bytes or one inflates like a zip bomb.
    `stored_only`, for torch.save's files (checkpoints, caches, tensors files): torch.save never compresses, and
    torch.load inflates a compressed record whole, so any compressed one is refused, the records may not declare
    more than the file holds, and the pickle is at most MAX_PICKLE_BYTES. `what` names the file in the message
    for one that is not a zip at all."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a readable {what} (not a zip archive, which torch.save and numpy write; "
                        f"truncated or another format: {type(e).__name__})") from None
    for m in members:
        if stored_only and (m.compress_type != zipfile.ZIP_STORED or m.compress_size != m.file_size):
            raise UserError(f"refusing {path}: its record {m.filename!r} is compressed ({m.file_size} bytes stored in "
                            f"{m.compress_size}); torch.save stores records uncompressed, and a compressed one could "
                            "inflate to any size")
        if stored_only and m.filename.rpartition("/")[2] == "data.pkl" and m.file_size > MAX_PICKLE_BYTES:
            raise UserError(f"refusing {path}: its pickle ({m.filename!r}) is {m.file_size / 2**20:.1f} MiB; a "
                            f"torch.save file's is at most {MAX_PICKLE_BYTES // 2**20} MiB (its tensors are records "
                            "of their own)")
        if m.file_size > MIN_BOMB_BYTES and m.file_size > MAX_INFLATION * max(m.compress_size, 1):
            raise UserError(f"{path}: its member {m.filename} inflates {m.file_size // max(m.compress_size, 1)} "
                            f"times, to {m.file_size / 2**30:.1f} GiB (a zip bomb, not data; at most "
                            f"{MAX_INFLATION} times)")
    total = sum(m.file_size for m in members)
    if stored_only and total > os.stat(path).st_size:
        raise UserError(f"refusing {path}: its records declare {total} bytes, more than the file's own "
                        f"{os.stat(path).st_size}")
    if total > budget:
        raise UserError(f"{path}: its contents declare {total / 2**30:.1f} GiB, more than the "
                        f"{budget / 2**30:.1f} GiB of memory this machine has for them")
    return members


def check_tensors(value: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse (UserError naming `where`, a file) a tensor anywhere in `value` (nested dicts, lists, tuples) that
    spans more bytes than its storage holds, a sparse tensor, containers nested deeper than `max_depth`, or more
    than MAX_VALUES values in all.

    torch.load(weights_only=True) rebuilds a tensor from a storage, a shape and strides: a stride of 0 makes a
    2x10^9-element view of one stored byte, which any copy (set_rng_state, load_state_dict, a cache write)
    materialises. A tensor whose elements fit in its storage costs at most the file's size. A pickle can also
    refer to one list many times: 7 KB made a list of 1000 references to a list of 1000 references to a list of
    1000 values, 10^9 values to a walk that follows references (this one took over a minute and gigabytes before
    it was bounded). Each container is walked once, lazily (memory grows with the depth, not the width), with a
    stack, not recursion: the pickle may nest lists thousands deep."""
    import torch

    seen: set[int] = set()
    left = MAX_VALUES
    stack: list[tuple[Iterator[tuple[str, Any]], int]] = [(iter([("", value)]), 0)]  # (key, value) pairs, depth
    while stack:
        items, depth = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        key, item = entry
        left -= 1
        if left < 0:
            raise UserError(f"refusing {where}: it holds more than {MAX_VALUES:,} values (a checkpoint holds a few "
                            "thousand, and at most one per class name)")
        if depth > max_depth:
            raise UserError(f"refusing {where}: its {key or 'content'} nests deeper than {max_depth} levels")
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided:  # a sparse tensor declares its dense size: to_dense() would allocate it
                raise UserError(f"refusing {where}: its tensor {key} is {item.layout}, not a dense tensor")
            stored = item.untyped_storage().nbytes()
            if item.numel() * item.element_size() > stored:
                raise UserError(f"refusing {where}: its tensor {key} of shape {tuple(item.shape)} is a view of "
                                f"{item.numel()} elements over {stored} stored bytes (strides {item.stride()}); "
                                "only tensors whose elements are all stored are read")
        elif isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))  # in the file's order, so the first bad tensor is named
            stack.append((_named_items(item, key), depth + 1))


def _named_items(container: dict | list | tuple, key: str) -> Iterator[tuple[str, Any]]:
    """(`key.k`, value) of a dict's items, (`key[i]`, value) of a list's or tuple's, one at a time."""
    if isinstance(container, dict):
        return ((f"{key}.{k}" if key else str(k), v) for k, v in container.items())
    return ((f"{key}[{i}]", v) for i, v in enumerate(container))


def load_torch_file(path: Path, budget: int) -> Any:
    """What a `torch.save` file holds, as data only (`weights_only`: no pickled code runs), checked first as
    `zip_members` checks it (uncompressed records, at most `budget` bytes) and then memory-mapped, so that no
    tensor is read before `check_tensors` has checked every one of them. torch.load's own errors pass."""
    import torch

    zip_members(path, budget, stored_only=True)  # torch.save never compresses: a deflated record is a bomb
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    check_tensors(loaded, str(path))
    return loaded


def require_memory(nbytes: int, what: str, hint: str, device: Any = None) -> None:
    """Raise UserError unless `nbytes` fit in the memory available to this process (see available_memory_bytes), or
    free on `device` where it is a CUDA device; `what` needs them, `hint` says what to do instead."""
    from trainer.system import available_memory_bytes, size_text

    if device is not None and device.type == "cuda":
        import torch

        available = torch.cuda.mem_get_info(device)[0]
    elif device is not None and device.type != "cpu":
        return  # MPS shares the host's memory and reports none of its own
    else:
        available = available_memory_bytes()
    if nbytes > available:
        raise UserError(f"{what} needs {size_text(nbytes)}, more than the {size_text(available)} of memory "
                        f"available here; {hint}")
