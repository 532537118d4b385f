"""Reading files from elsewhere: each is refused within seconds and a bounded amount of memory, whatever it holds.

Run directories, datasets and their caches get copied in from other machines and other people. What a file
*declares* (its type, its size, a zip member's inflated size, an array header's shape, a tensor's strides) is
checked against a bound before anything that size is allocated: a few-kilobyte file must not be able to make a
command read forever (a FIFO, a link to /dev/zero) or allocate gigabytes (YAML aliases, a zip bomb, a
zero-stride view) before it is refused in one line.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import MAX_DEPTH, UserError

MAX_TEXT_BYTES = 4 * 2**20  # a run directory's metrics.json, overrides.yaml or config.yaml is a few KiB
# A zip member inflating more than this many times its stored size, past MIN_BOMB_BYTES, is refused: deflate
# gets image arrays down 2-10 times; 1000 times is a file of zeros made to fill memory.
MAX_INFLATION = 100
MIN_BOMB_BYTES = 16 * 2**20

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
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: is {file_kind(mode)}, not a regular file; only regular files are read")
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


def parse_yaml(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """`text` as plain YAML values (no tags), refusing aliases and nesting deeper than `max_depth` before any
    structure is built: an alias lets 300 KB expand into gigabytes ("billion laughs"), and nesting thousands
    deep exhausts the recursion of the parser. Neither Hydra nor OmegaConf writes either."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events, one at a time: nothing is built yet
            if isinstance(event, yaml.AliasEvent):
                raise UserError(f"{where}: uses a YAML alias (*{event.anchor}), which files of this project never "
                                "hold")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise UserError(f"{where}: nested more than {max_depth} levels deep, deeper than any file of this "
                                    "project")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(e).split())[:120]})") from None


def load_yaml(path: str | os.PathLike, cap: int = MAX_TEXT_BYTES) -> Any:
    """The YAML in `path`, read as `read_regular` reads and parsed as `parse_yaml` parses."""
    return parse_yaml(_text(path, cap), str(path))


def zip_members(path: Path, budget: int, *, stored_only: bool = False) -> list[zipfile.ZipInfo]:
    """The members of the zip file `path` (.npz, .pt), refused (UserError) before anything is inflated if, as its
    directory declares them, they add up to more than `budget` bytes, one inflates like a zip bomb, or (with
    `stored_only`: torch.save never compresses) one is compressed at all. An inflating member stops at the size
    its directory declares, so the declared sizes bound what reading them can allocate."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable zip file ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                        ) from None
    total = sum(m.file_size for m in members)
    if total > budget:
        raise UserError(f"{path}: its contents declare {total / 2**30:.1f} GiB, more than the "
                        f"{budget / 2**30:.1f} GiB of memory this machine has for them")
    for m in members:
        if stored_only and m.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{path}: its record {m.filename} is compressed, which torch.save never does; refusing "
                            "to inflate it")
        if m.file_size > MIN_BOMB_BYTES and m.file_size > MAX_INFLATION * max(m.compress_size, 1):
            raise UserError(f"{path}: its member {m.filename} inflates {m.file_size // max(m.compress_size, 1)} "
                            f"times, to {m.file_size / 2**30:.1f} GiB (a zip bomb, not data; at most "
                            f"{MAX_INFLATION} times)")
    return members


def require_within_storage(values: Any, where: str, key: str = "") -> None:
    """Refuse a tensor, anywhere in `values` (nested dicts, lists, tuples), that spans more bytes than its storage
    holds: a zero-stride or overlapping view, as the unpickler accepts it, is a few bytes in the file and its full
    size as soon as anything copies it."""
    import torch

    if isinstance(values, dict):
        for k, v in values.items():
            require_within_storage(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(values, (list, tuple)):
        for i, v in enumerate(values):
            require_within_storage(v, where, f"{key}[{i}]")
    elif isinstance(values, torch.Tensor):
        stored = values.untyped_storage().nbytes()
        if values.numel() * values.element_size() > stored:
            raise UserError(f"{where}: {key} is a view of {values.numel()} elements {tuple(values.shape)} over "
                            f"{stored} stored bytes (strides {tuple(values.stride())}); only tensors whose "
                            "elements are all stored are read")


def load_torch_file(path: Path, budget: int) -> Any:
    """What a `torch.save` file holds, as data only (`weights_only`: no pickled code runs), checked first as
    `zip_members` checks it (uncompressed records, at most `budget` bytes) and then memory-mapped, so that no
    tensor is read before `require_within_storage` has checked every one of them. torch.load's own errors pass."""
    import torch

    zip_members(path, budget, stored_only=True)  # torch.save never compresses: a deflated record is a bomb
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    require_within_storage(loaded, str(path))
    return loaded
