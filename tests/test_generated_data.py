"""The generated task datasets (trainer.data.generated) and the command that writes them (htt-make-data,
scripts/make_task_data.py in a checkout).

The library functions take MNIST as arrays, so these tests give them fake digits whose every pixel is nonzero and
whose noise makes each one unique: a blank mosaic cell is then all zeros, and any other cell, or an unturned digit,
can be traced back to the exact source image it came from.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_dataset

from trainer.data import generated

SCRIPT = REPO / "scripts" / "make_task_data.py"
TINY = {"train": 64, "test": 16}
KEYS = {"train_x", "train_y", "test_x", "test_y", "classes"}


def fake_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 digits of noise in 1..255 and (n,) uint8 labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


TRAIN_DIGITS, TRAIN_LABELS = fake_mnist(300, seed=1)
TEST_DIGITS, TEST_LABELS = fake_mnist(100, seed=2)
TRAIN_INDEX = {image.tobytes(): j for j, image in enumerate(TRAIN_DIGITS)}
TEST_INDEX = {image.tobytes(): j for j, image in enumerate(TEST_DIGITS)}


def make(task: str, seed: int = 0, **sizes) -> dict[str, np.ndarray]:
    sizes = sizes or TINY
    if task == "counts":
        return generated.counts(seed=seed, **sizes)
    if task == "mosaic":
        return generated.mosaic(TRAIN_DIGITS, TRAIN_LABELS, TEST_DIGITS, TEST_LABELS, seed=seed, **sizes)
    return generated.rotation(TRAIN_DIGITS, TEST_DIGITS, seed=seed, **sizes)


def components(images: np.ndarray, threshold: int = 128) -> list[int]:
    """The number of 8-connected bright regions in each of `images` (N, H, W): every bright pixel starts with its
    own id, then takes the largest id in its 3x3 neighbourhood until nothing changes, leaving one id per region."""
    bright = torch.from_numpy(images >= threshold).unsqueeze(1)  # (N, 1, H, W)
    ids = torch.arange(1, bright.numel() + 1, dtype=torch.float64).reshape(bright.shape) * bright
    while True:
        spread = torch.nn.functional.max_pool2d(ids, 3, stride=1, padding=1) * bright
        if torch.equal(spread, ids):
            break
        ids = spread
    return [len(torch.unique(image[image > 0])) for image in ids]


@pytest.mark.parametrize("task, shape, label_shape, label_dtype, classes", [
    ("counts", (32, 32), (), np.float32, ["count"]),
    ("mosaic", (56, 56), (10,), np.uint8, [str(d) for d in range(10)]),
    ("rotation", (28, 28), (), np.float32, ["angle"]),
])
def test_arrays_have_the_tensors_file_keys_shapes_and_dtypes(task, shape, label_shape, label_dtype, classes):
    arrays = make(task)
    assert set(arrays) == KEYS
    for split, n in TINY.items():
        assert arrays[f"{split}_x"].shape == (n, *shape) and arrays[f"{split}_x"].dtype == np.uint8
        assert arrays[f"{split}_y"].shape == (n, *label_shape) and arrays[f"{split}_y"].dtype == label_dtype
    assert arrays["classes"].tolist() == classes


@pytest.mark.parametrize("task", ["counts", "mosaic", "rotation"])
def test_the_seed_alone_decides_the_arrays(task):
    first, again, other = make(task, seed=3), make(task, seed=3), make(task, seed=4)
    assert all(np.array_equal(first[k], again[k]) for k in KEYS)
    assert not np.array_equal(first["train_x"], other["train_x"])
    assert not np.array_equal(first["test_x"], other["test_x"])
    # the test split has a stream of its own: a larger training set leaves it as it was
    bigger = make(task, seed=3, train=80, test=16)
    assert np.array_equal(bigger["test_x"], first["test_x"]) and np.array_equal(bigger["test_y"], first["test_y"])


def test_each_counts_label_is_the_number_of_separate_objects_in_its_image():
    arrays = generated.counts(seed=5, train=300, test=50)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        assert components(x) == y.astype(int).tolist()  # objects that touched would merge into one
        assert ((x < generated.NOISE) | (x >= 160)).all()  # faint noise, bright objects, nothing between
        assert (y == np.round(y)).all() and 0 <= y.min() and y.max() <= generated.MAX_OBJECTS
    assert (arrays["train_x"] > 0).mean() > 0.5  # there is background noise
    # both object sizes: 21 and 37 pixel discs, 16 and 36 pixel squares
    one = arrays["train_x"][arrays["train_y"] == 1] >= 128
    assert set(one.sum(axis=(1, 2)).tolist()) == {16, 21, 36, 37}


def test_counts_follow_a_poisson_law_with_a_rate_drawn_per_image():
    y = generated.counts(seed=0, train=4000, test=1)["train_y"]
    # rate ~ Uniform(0.5, 6): mean 3.25; variance E[rate] + Var[rate] = 3.25 + 5.5**2 / 12 = 5.77 (over-dispersed)
    assert abs(y.mean() - 3.25) < 0.15
    assert abs(y.var() - 5.77) < 0.6
    assert y.max() >= 11


def test_counts_place_fifteen_objects_when_fifteen_are_drawn():
    image = np.zeros((32, 32), dtype=np.uint8)
    generated._place(np.random.default_rng(0), image, generated.MAX_OBJECTS, generated._templates())
    assert components(image[None]) == [generated.MAX_OBJECTS]


def test_each_mosaic_cell_is_blank_or_a_digit_of_its_split_and_the_labels_are_those_digits():
    arrays = generated.mosaic(TRAIN_DIGITS, TRAIN_LABELS, TEST_DIGITS, TEST_LABELS, seed=7, train=400, test=100)
    shown = []
    for split, index, labels in (("train", TRAIN_INDEX, TRAIN_LABELS), ("test", TEST_INDEX, TEST_LABELS)):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        for image, multi_hot in zip(x, y):
            digits = set()
            for r in (0, 28):
                for c in (0, 28):
                    cell = image[r:r + 28, c:c + 28]
                    if cell.any():
                        digits.add(int(labels[index[cell.tobytes()]]))  # KeyError: not a digit of this split
                        shown.append(1)
                    else:
                        shown.append(0)
            assert digits, "a mosaic without a digit"
            assert multi_hot.tolist() == [int(d in digits) for d in range(10)]
    # each cell holds a digit with probability 0.6, given at least one of four: 0.6 / (1 - 0.4**4) = 0.616
    assert abs(np.mean(shown) - 0.616) < 0.04


@pytest.mark.parametrize("degrees", [30.0, -17.5, 45.0, 90.0])
def test_rotate_turns_as_torchvision_does(degrees):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import rotate

    images = TRAIN_DIGITS[:8].copy()
    images[:, :, :10] = 0  # asymmetric, so a turn the wrong way shows
    expected = rotate(torch.from_numpy(images).unsqueeze(1), degrees, interpolation=InterpolationMode.BILINEAR)
    got = generated.rotate(images, np.full(8, degrees))
    assert np.abs(got.astype(int) - expected.squeeze(1).numpy().astype(int)).max() <= 1


def test_rotate_by_zero_returns_each_image_exactly():
    assert np.array_equal(generated.rotate(TRAIN_DIGITS, np.zeros(len(TRAIN_DIGITS))), TRAIN_DIGITS)


def test_rotation_images_are_their_source_digits_turned_by_their_labels():
    unturned = generated.rotation(TRAIN_DIGITS, TEST_DIGITS, seed=2, train=200, test=50, max_degrees=0)
    assert not unturned["train_y"].any() and not unturned["test_y"].any()
    turned = generated.rotation(TRAIN_DIGITS, TEST_DIGITS, seed=2, train=200, test=50, max_degrees=30)
    for split, index, digits in (("train", TRAIN_INDEX, TRAIN_DIGITS), ("test", TEST_INDEX, TEST_DIGITS)):
        chosen = [index[image.tobytes()] for image in unturned[f"{split}_x"]]  # KeyError: not a digit of this split
        assert len(set(chosen)) == min(len(chosen), len(digits))  # no digit twice before all were used
        # the same seed draws the same digits whatever the range of the angles
        angles = turned[f"{split}_y"]
        assert np.array_equal(turned[f"{split}_x"], generated.rotate(digits[chosen], angles))
        assert -30 <= angles.min() < -20 and 20 < angles.max() <= 30


@pytest.mark.parametrize("call, message", [
    (lambda: generated.counts(train=0), "train=0"),
    (lambda: generated.counts(test=-1), "test=-1"),
    (lambda: generated.counts(seed=-1), "seed=-1"),
    (lambda: generated.mosaic(TRAIN_DIGITS[:, :20], TRAIN_LABELS, TEST_DIGITS, TEST_LABELS), "mnist_images"),
    (lambda: generated.mosaic(TRAIN_DIGITS, TRAIN_LABELS[:5], TEST_DIGITS, TEST_LABELS), "mnist_labels"),
    (lambda: generated.rotation(TRAIN_DIGITS, TEST_DIGITS.astype(np.float32)), "mnist_test_images"),
    (lambda: generated.rotation(TRAIN_DIGITS, TEST_DIGITS, max_degrees=200), "max_degrees=200"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def run_script(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # this checkout's package, not whichever one the interpreter has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def test_the_command_writes_a_loadable_file_and_the_same_bytes_again(tmp_path):
    out = tmp_path / "c.npz"
    done = run_script("counts", "--train", "64", "--test", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (") and done.stdout.count("\n") == 1
    assert "count mean" in done.stdout
    with np.load(out, allow_pickle=False) as npz:
        assert set(npz.files) == KEYS
        assert npz["train_x"].shape == (64, 32, 32) and npz["test_y"].shape == (16,)
        assert components(npz["train_x"]) == npz["train_y"].astype(int).tolist()
        first = {k: npz[k] for k in npz.files}
    assert all(np.array_equal(first[k], v) for k, v in generated.counts(train=64, test=16).items())
    bytes_before = out.read_bytes()
    assert run_script("counts", "--train", "64", "--test", "16", "--out", str(out)).returncode == 0
    assert out.read_bytes() == bytes_before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left beside it


@pytest.mark.parametrize("task, shape", [("mosaic", (56, 56)), ("rotation", (28, 28))])
def test_the_command_reads_mnist_from_its_root(tmp_path, task, shape):
    make_tiny_dataset(tmp_path / "data", n_train=100, n_test=30)
    done = run_script(task, "--train", "20", "--test", "5", cwd=tmp_path)  # defaults: data/, data/tasks/<task>.npz
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "data" / "tasks" / f"{task}.npz", allow_pickle=False) as npz:
        assert npz["train_x"].shape == (20, *shape) and npz["test_x"].shape == (5, *shape)


@pytest.mark.parametrize("args, message", [
    (["counts", "--train", "0"], "error: --train=0: must be an integer >= 1"),
    (["counts", "--test", "-3"], "error: --test=-3: must be an integer >= 1"),
    (["mosaic", "--mnist-root", "{tmp}/file"], "error: --mnist-root={tmp}/file: is a file, not a folder"),
    (["counts", "--out", "{tmp}/file/c.npz"], "error: --out={tmp}/file/c.npz: {tmp}/file is a file, not a folder"),
    (["counts", "--out", "{tmp}/c.txt"], "error: --out={tmp}/c.txt: must end in .npz"),
])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    done = run_script(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.startswith(message.format(tmp=tmp_path)) and done.stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_unwritable_out_is_refused(tmp_path):
    # /proc takes no new files, not even from root (a read-only folder would not stop root)
    done = run_script("counts", "--out", "/proc/c.npz", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith("error: cannot write /proc/c.npz: ")
    assert done.stdout == "" and done.stderr.count("\n") == 1
