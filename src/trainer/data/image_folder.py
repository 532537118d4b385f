"""The user's own folder of images: one sub-folder per class, or the images a labels CSV lists with their targets."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import stat
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data.dataset import ImageDataset, Images
from trainer.data.decode import SUFFIXES, choose_shape, decode, survey
from trainer.errors import UserError
from trainer.run.untrusted import MAX_CLASSES, file_kind
from trainer.system import host_memory_bytes, size_text

SPLIT_DIRS = ("train", "val", "test")
LABEL_TASKS = {"multi_hot": "multilabel", "values": "regression"}  # the targets a labels file gives, by task
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a larger value would become inf in the float32 targets


class ImageFolder(ImageDataset):
    """Images in `path`, in one of two layouts:

    - `path/<class>/*.png|jpg|...`: the test and validation splits are held out by `split_seed`;
    - `path/train/<class>/...` with `path/test/<class>/...` or `path/val/<class>/...` or both; a split without
      its folder is held out from train/.

    Class names are the class folders' names, sorted. Any size and mode: every image is converted to
    `channels` (1 or 3; null: 3 if any image has colour) and resized to `image_size` ([H, W]; null: the
    most common size).

    With `labels` (a CSV file: a header `file,<name1>,<name2>,...`, then per image its path relative to `path`
    and one value per name), the images it lists are read with its targets instead: 0/1 per label for
    task=multilabel, numbers for task=regression; the names are the classes and class folders play no part.
    Rows under train/, val/ and test/ form those splits in the split layout; otherwise the test and validation
    splits are held out by `split_seed`.
    """

    target_kinds = ("class", "multi_hot", "values")  # class folders give classes; a labels CSV the others

    def __init__(self, *, path: str, image_size: list[int] | None, channels: int | None, labels: str | None = None,
                 **common: Any) -> None:
        self.path = Path(path).expanduser()
        self.labels = None if labels is None else Path(labels).expanduser()
        self.image_size, self.channels = image_size, channels
        self.name = self.path.name or "ImageFolder"
        kind = common.get("targets", "class")  # the base class checks it and keeps it, after the scan
        if labels is None and kind in LABEL_TASKS:
            raise UserError(f"task={LABEL_TASKS[kind]} reads its targets from a labels file: set "
                            "dataset.labels=FILE.csv (class folders give class indices only)")
        if labels is not None and kind not in LABEL_TASKS:
            raise UserError(f"dataset.labels={labels}: a labels file is for task=multilabel or task=regression; "
                            "for classification use class folders")
        self._splits = self._scan() if self.labels is None else self._scan_labels(kind)
        super().__init__(**common)

    def sources(self) -> list[str]:  # paths as strings: 50,000 Path objects would cost a tenth of a second
        return [f for files, _ in self._splits.values() for f in files]

    def cache_dir(self, files: list[str]) -> Path:
        return self.path

    def stamp(self, files: list[str]) -> str:
        # by _scan(_labels): one stat per file, named below the folder as given; relative to it here, so the folder
        # given as a relative or an absolute path is one cache (its key has the resolved path)
        root = str(self.path)
        return hashlib.sha256("\n".join(s.removeprefix(root) for s in self._stats).encode()).hexdigest()

    def cache_options(self) -> dict[str, Any]:
        options = {"path": str(self.path.resolve()), "image_size": self.image_size, "channels": self.channels}
        if self.labels is not None:  # another labels file over the same folder: another cache (none: the key as before)
            options["labels"] = str(self.labels.resolve())
        return options

    def read(self) -> Images:
        files = self.sources()
        sizes, colour = survey(len(files), lambda i: _open(files[i]), lambda i: str(files[i]))
        shape = choose_shape(sizes, colour, self.image_size, self.channels, str(self.path))
        target = self.decode_target((len(files), *shape))  # on disk, beyond dataset.memory_budget_gib
        if target is None:
            self.require_memory(len(files) * shape[0] * shape[1] * shape[2])
        images = decode(len(files), lambda i: _open(files[i]), lambda i: str(files[i]), shape, str(self.path),
                        target)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for split, (split_files, labels) in self._splits.items():
            out[f"{split}_x"], out[f"{split}_y"] = images[start:start + len(split_files)], torch.tensor(labels)
            start += len(split_files)
        return Images(classes=self._classes, **out)

    def _scan(self) -> dict[str, tuple[list[str], list[int]]]:
        """{split: (image files, class indices)} in a fixed order; raises UserError for an unusable folder."""
        if not self.path.is_dir():
            raise UserError(f"dataset.path={self.path}: not a directory (give a folder of class folders of images)")
        # train/ beside test/ or val/ (or both) is the split layout; a split it lacks is held out from train/
        split_layout = (self.path / "train").is_dir() and any((self.path / s).is_dir() for s in ("val", "test"))
        roots = {s: self.path / s for s in SPLIT_DIRS if (self.path / s).is_dir()} if split_layout else {
            "train": self.path}
        self._classes = _class_dirs(roots["train"])
        splits, self._stats = {}, []
        for split, root in roots.items():
            extra = sorted(set(_class_dirs(root, required=False)) - set(self._classes))
            if extra:
                raise UserError(f"{root}: class folder {extra[0]!r} is not among the training classes in "
                                f"{roots['train']} ({', '.join(self._classes)})")
            files, labels = [], []
            for label, name in enumerate(self._classes):
                found = _images_in(root / name, self._stats) if (root / name).is_dir() else []
                if not found and split == "train":
                    raise UserError(f"{root / name}: no images (class folders hold .png, .jpg, ... files: "
                                    f"{', '.join(sorted(SUFFIXES))})")
                files += found
                labels += [label] * len(found)
            if not files:
                raise UserError(f"{root}: no images in its class folders")
            splits[split] = (files, labels)
        return splits

    def _scan_labels(self, kind: str) -> dict[str, tuple[list[str], np.ndarray]]:
        """{split: (image files, (N, K) float64 targets)} as the labels CSV lists them, in its order; raises
        UserError, naming the file, the line and the value, for anything but the format the class docstring gives."""
        if not self.path.is_dir():
            raise UserError(f"dataset.path={self.path}: not a directory (give the folder the paths in "
                            f"dataset.labels={self.labels} are relative to)")
        text, st = _read_labels_file(self.labels)
        self._stats = [f"{self.labels.resolve()} {st.st_size} {st.st_mtime_ns}"]  # a changed CSV: a new decode
        root = str(self.path)
        split_layout = (self.path / "train").is_dir() and any((self.path / s).is_dir() for s in ("val", "test"))
        reader = csv.reader(io.StringIO(text, newline=""))
        where = f"dataset.labels={self.labels}"
        try:
            header = next(reader, None)
            self._classes = _label_names(header, where, kind)
            width = len(self._classes)
            listed: dict[str, int] = {}  # path -> the line that lists it
            found: dict[str, tuple[list[str], array]] = {s: ([], array("d")) for s in SPLIT_DIRS}
            for row in reader:
                if not row:  # a blank line
                    continue
                line = f"{where} line {reader.line_num}"
                if len(row) != width + 1:
                    raise UserError(f"{line}: {len(row)} field{'s' * (len(row) != 1)}, not {width + 1} (the file, then "
                                    f"one value for each of {', '.join(self._classes)})")
                rel, full, file_stat = _listed_image(root, row[0], line)
                if rel in listed:
                    raise UserError(f"{line}: {row[0]!r} is listed twice (first on line {listed[rel]}); each image "
                                    "has one row")
                listed[rel] = reader.line_num
                split = "train"
                if split_layout:
                    split = rel.split("/", 1)[0]
                    if split not in SPLIT_DIRS:
                        raise UserError(f"{line}: {row[0]!r} is not under train/, val/ or test/ ({root} has the "
                                        "split layout: train/ beside val/ or test/; each row's file is in one)")
                files, values = found[split]
                files.append(full)
                values.extend(_targets(row[1:], self._classes, kind, line))
                self._stats.append(f"{full} {file_stat.st_size} {file_stat.st_mtime_ns}")
        except csv.Error as e:
            raise UserError(f"{where} line {reader.line_num}: not readable as CSV ({e})") from None
        if not found["train"][0]:
            held = "under train/ " if split_layout else ""
            raise UserError(f"{where}: no image rows {held}after its header (one row per image: file,<values>)")
        return {split: (files, np.frombuffer(values, dtype=np.float64).reshape(-1, width))
                for split, (files, values) in found.items() if files}


def _class_dirs(root: Path, required: bool = True) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not names:
        raise UserError(f"{root}: no class folders in it (the layout is {root}/<class>/<image files>)")
    return names


def _images_in(folder: Path, stats: list[str]) -> list[str]:
    """The image files under `folder` (recursively, skipping hidden names), sorted; appends "path size mtime" of
    each to `stats`. os.scandir, not Path.rglob: a folder of 50,000 images is listed in a fraction of a second.
    A symlinked folder leading back into one already listed (a loop) is refused, naming the link: followed, it
    would list the same images again and again until the kernel stops it (ELOOP) with no path in its message."""
    found = []
    pending = [str(folder)]
    seen: set[tuple[int, int]] = set()
    while pending:
        current = pending.pop()
        try:
            st = os.stat(current)
            if (st.st_dev, st.st_ino) in seen:
                raise UserError(f"{current}: a symbolic link back to a folder already read (a loop); remove it "
                                f"or point it elsewhere")
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() in SUFFIXES and entry.is_file():
                        st = entry.stat()
                        found.append((entry.path, f"{entry.path} {st.st_size} {st.st_mtime_ns}"))
        except OSError as e:
            raise UserError(f"{e.filename or current}: cannot list it ({e.strerror or e})") from None
    found.sort()
    stats += [stat for _, stat in found]
    return [path for path, _ in found]


def _labels_bytes_limit() -> int:
    """The largest labels CSV read. Parsed, a row keeps its path twice (the file list and the cache stamp, Python
    strings of 50 bytes and more) and 8 bytes per value (2 in the file: `0,`), and its fields are strings of 50
    bytes and more for a moment: the smallest rows take about 30 times their size. A 64th of the memory keeps that
    under half of it, and still allows 2 million rows of 128 bytes on a machine of 16 GiB."""
    return host_memory_bytes() // 64


def _read_labels_file(path: Path) -> tuple[str, os.stat_result]:
    """The text of the labels CSV (a leading BOM dropped) and its stat; its kind and size are checked before it is
    read. Opened without blocking: a FIFO is refused at once, a link to /dev/zero is never read."""
    where = f"dataset.labels={path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror or e}); give a CSV file (relative paths are relative "
                        "to the current folder)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which raises an error of its own for a directory
        os.close(fd)
        raise UserError(f"{where}: is {file_kind(st.st_mode)}, not a regular file; give a CSV file")
    limit = _labels_bytes_limit()
    with os.fdopen(fd, "rb") as f:
        # its size first, then what it holds, which the read bounds again: it may grow while it is read
        data = b"" if st.st_size > limit else f.read(st.st_size + 1)
    if st.st_size > limit or len(data) > limit:
        raise UserError(f"{where}: larger than {size_text(limit)}, the most a labels file may be on this machine "
                        f"(a 64th of its {size_text(host_memory_bytes())} of memory)")
    try:
        return data.decode("utf-8-sig"), st
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{where} line {line}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None


def _label_names(header: list[str] | None, where: str, kind: str) -> list[str]:
    """The label (multi_hot) or column (values) names of a labels CSV's header row `file,<name1>,<name2>,...`."""
    what = "label" if kind == "multi_hot" else "column"
    form = f"the first row is file,<{what}1>,<{what}2>,..."
    if header is None:
        raise UserError(f"{where}: empty; {form}, then one row per image")
    if not header or header[0].strip() != "file":
        first = header[0] if header else ""
        raise UserError(f"{where} line 1: the header starts with {first!r}, not file; {form}")
    names = [name.strip() for name in header[1:]]
    if not names:
        raise UserError(f"{where} line 1: no {what} names after file; {form}")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{where} line 1: {len(names)} {what} names, more than the {MAX_CLASSES} allowed")
    for i, name in enumerate(names):
        if not name:
            raise UserError(f"{where} line 1: {what} {i + 1} has no name; {form}")
        if name in names[:i]:
            raise UserError(f"{where} line 1: {what} name {name!r} appears twice; each {what} has its own name")
    return names


def _listed_image(root: str, name: str, where: str) -> tuple[str, str, os.stat_result]:
    """The normalised relative path, the full path and the stat of the image a labels CSV row lists as `name`.
    The listed path must stay inside `root` as written (no absolute path, no `..`); a symbolic link on it may
    lead elsewhere, as one in a class folder may."""
    allowed = f"each row starts with an image's path relative to dataset.path ({root}), with forward slashes"
    if "\\" in name:
        raise UserError(f"{where}: file {name!r} has a backslash; {allowed}")
    if name.startswith("/"):
        raise UserError(f"{where}: file {name!r} is an absolute path; {allowed}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UserError(f"{where}: file {name!r} goes up with '..'; {allowed}, inside it")
    if not parts or "\0" in name:
        raise UserError(f"{where}: file {name!r} is not a file name; {allowed}")
    if os.path.splitext(parts[-1])[1].lower() not in SUFFIXES:
        raise UserError(f"{where}: file {name!r} is not an image file (one of {', '.join(sorted(SUFFIXES))})")
    rel = "/".join(parts)
    full = os.path.join(root, rel)
    try:
        st = os.stat(full)
    except OSError as e:
        raise UserError(f"{where}: file {name!r}: cannot read {full} ({e.strerror or e}); {allowed}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{where}: file {name!r} is {file_kind(st.st_mode)}, not an image file")
    return rel, full, st


def _targets(fields: list[str], names: list[str], kind: str, where: str) -> list[float]:
    """One row's values: each 0 or 1 (multi_hot), or a finite number that float32 holds (values)."""
    out = []
    for name, text in zip(names, fields):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if kind == "multi_hot" and value not in (0.0, 1.0):
            raise UserError(f"{where}: {text!r} for label {name!r}; each label is 0 (absent) or 1 (present)")
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise UserError(f"{where}: {text!r} for column {name!r}; each value is a finite number (at most "
                            f"{FLOAT32_MAX:.3g} in size)")
        out.append(value)
    return out


def _open(path: Path) -> Any:
    from PIL import Image

    return Image.open(path)
