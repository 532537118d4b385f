"""Images and labels already in arrays: a `.npz` (NumPy) or `.pt` (PyTorch) file."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.dataset import ImageDataset, Images
from trainer.errors import UserError
from trainer.run.checkpoint import pickled_global
from trainer.run.untrusted import load_torch_file, zip_members
from trainer.system import host_memory_bytes, size_text

KEYS = ("train_x", "train_y", "test_x", "test_y", "classes")


class TensorsFile(ImageDataset):
    """`path`: a `.npz` or `.pt` file holding `train_x`, `train_y` and optionally `test_x`, `test_y` and `classes`.

    Images are uint8 (N, H, W), (N, H, W, C) or (N, C, H, W); labels integer class indices, or for other tasks
    (N, K) multi-hot 0/1 labels (task=multilabel) or (N,) / (N, D) numbers (task=regression). Without `classes`
    the classes (labels, columns) are named 0, 1, ... up to the largest label (a single column: `value`). The file
    is read as data only: `.npz` without pickles, `.pt` with `weights_only=True`, so a file from a stranger runs
    no code. What it
    declares (zip member sizes, array headers, tensor strides) is checked against this machine's memory before
    anything is inflated or copied, so a small file cannot make it allocate gigabytes before it is refused.
    """

    target_kinds = ("class", "multi_hot", "values")  # whatever train_y holds: the task says how to read it

    def __init__(self, *, path: str, **common: Any) -> None:
        self.path = Path(path).expanduser()
        self.name = self.path.stem
        super().__init__(**common)

    def sources(self) -> list[Path]:
        if not self.path.is_file():
            raise UserError(f"dataset.path={self.path}: no such file (give a .npz or .pt file)")
        return [self.path]

    def cache_options(self) -> dict[str, Any]:
        # a.npz and a.pt beside each other share a stem, hence a cache name: the key tells them apart
        return {"path": str(self.path.resolve())}

    def read(self) -> Images:
        arrays = self._arrays()
        for key in ("train_x", "train_y"):
            if key not in arrays:
                raise UserError(f"{self.path}: no {key!r} in it (it has {', '.join(sorted(arrays)) or 'nothing'}; "
                                f"expected {', '.join(KEYS)})")
        unknown = sorted(set(arrays) - set(KEYS))
        if unknown:
            raise UserError(f"{self.path}: unknown key {unknown[0]!r} (expected {', '.join(KEYS)})")
        if ("test_x" in arrays) != ("test_y" in arrays):
            raise UserError(f"{self.path}: test_x and test_y come together")
        classes = arrays.get("classes")
        if classes is None and self.targets != "class":  # one name per label or column: 0, 1, ... (one: "value")
            y = np.asarray(arrays["train_y"])
            width = y.shape[1] if y.ndim == 2 else 1
            classes = ["value"] if self.targets == "values" and width == 1 else [str(i) for i in range(width)]
        elif classes is None:
            labels = [np.asarray(arrays[k]) for k in ("train_y", "test_y") if k in arrays]
            top = max((int(y.max()) for y in labels if y.size and np.issubdtype(y.dtype, np.integer)), default=0)
            classes = [str(i) for i in range(top + 1)]
        else:
            classes = [str(c) for c in np.asarray(classes).tolist()]
        return Images(arrays["train_x"], arrays["train_y"], classes, arrays.get("test_x"), arrays.get("test_y"))

    def _arrays(self) -> dict[str, Any]:
        suffix = self.path.suffix.lower()
        if suffix not in (".npz", ".pt"):
            raise UserError(f"dataset.path={self.path}: a .npz or .pt file, not {suffix or 'a file without suffix'}")
        try:
            if suffix == ".npz":
                members = zip_members(self.path, host_memory_bytes())
                declared = [self._npy_bytes(self.path, m) for m in members]
                largest, (most, _) = max(zip(members, declared), key=lambda pair: pair[1][0])
                self.require_memory(sum(nbytes for nbytes, _ in declared),
                                    f"the arrays of {self.path.name} (its {largest.filename} alone {size_text(most)})",
                                    "give a file whose arrays fit in memory")
                for member, (nbytes, held) in zip(members, declared):
                    if nbytes != held:  # np.load allocates what the header says, then reads what there is
                        raise UserError(f"{self.path}: its array {member.filename} declares {nbytes} bytes in its "
                                        f"header but holds {held}")
                with np.load(self.path, allow_pickle=False) as npz:
                    return {k: npz[k] for k in npz.files}
            loaded = load_torch_file(self.path, host_memory_bytes())
            if not isinstance(loaded, dict):
                raise UserError(f"{self.path}: holds a {type(loaded).__name__}, not a dict of {', '.join(KEYS)}")
            return loaded
        except (ValueError, OSError, zipfile.BadZipFile, RuntimeError, EOFError) as e:
            detail = " ".join(str(e).split())[:160]
            raise UserError(f"{self.path}: not a readable {suffix} file ({type(e).__name__}: {detail})") from None
        except UserError:
            raise
        except Exception as e:  # pickle.UnpicklingError for anything but tensors and plain values
            what = pickled_global(e)
            raise UserError(f"{self.path}: refusing to load it: it holds a pickled {what or 'Python'} object, and only "
                            "tensors, arrays and plain values are loaded (nothing in it was run)") from None

    @staticmethod
    def _npy_bytes(path: Path, member: zipfile.ZipInfo) -> tuple[int, int]:
        """The bytes the array in `member` of an .npz declares in its header (read from its first few hundred
        bytes: nothing else is inflated), and the bytes it holds after the header (as the zip directory says)."""
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{member.filename}: npy format version {version} is not read")
            shape, _, dtype = read_header(f)
            header = f.tell()
        held = member.file_size - header
        if dtype.hasobject:  # a pickle: np.load(allow_pickle=False) refuses it without reading it
            return held, held
        return math.prod(shape) * dtype.itemsize, held
