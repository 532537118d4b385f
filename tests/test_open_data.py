"""Open data: image folders, arrays files, torchvision datasets and a user's own class, through one fast path.

Each source is generated small, in its real on-disk format; no network is used.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_train, run_train_stopping
from hydra import compose, initialize_config_dir
from image_data import arrays, cifar10_batches, idx_files, image_folder, pattern
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainer.data.dataset as dataset_module
from trainer.cli.config import build
from trainer.data import (
    BatchLoader,
    BatchTransform,
    ImageFolder,
    random_crop,
    random_hflip,
)
from trainer.data.tensors import TensorsFile
from trainer.errors import UserError
from trainer.system import canonical_device

FAST = ("dataset.batch_size=16", "dataset.eval_batch_size=64", "trainer.device=cpu", "trainer.log_every_n_steps=5",
        "scheduler=none", "optimizer.lr=0.01")


def dataset(*overrides: str, device: str = "cpu"):
    """The dataset train.py would build with these overrides."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return build(cfg.dataset, device=device, seed=0)


def mixed_folder(root):
    """Three classes, one with a space in its name; PNG and JPEG; RGB, grey and RGBA; two sizes; and files that
    are not images (a note, a hidden file)."""
    rng = np.random.default_rng(1)
    for k, name in enumerate(["a cat", "b", "c"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(40):
            size = (16, 16) if i % 8 else (20, 12)  # 1 in 8 is another size: resized to the common 16x16
            img = Image.fromarray(pattern(k, *size, rng))
            if i % 10 == 3:
                img = img.convert("L")
            img.save(folder / f"{i}.{'jpg' if i == 5 else 'png'}")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"ignored")
    rgba = np.concatenate([pattern(0, 16, 16, rng), np.full((16, 16, 1), 7, np.uint8)], axis=2)  # (16, 16, 4)
    Image.fromarray(rgba, "RGBA").save(root / "a cat" / "rgba.png")
    return root, rgba


def test_image_folder_of_mixed_files(tmp_path, monkeypatch):
    root, rgba = mixed_folder(tmp_path / "pets")
    data = dataset("dataset=image_folder", f"dataset.path={root}", "dataset.val_size=0.1", "dataset.test_size=0.2")
    assert data.classes == ("a cat", "b", "c") and data.in_shape == (3, 16, 16) and data.name == "pets"
    n = 121  # 3 x 40 and the RGBA one; no note, no hidden file
    assert (data.test.num_items, data.val.num_items, data.train.num_items) == (24, 12, n - 36)
    images, labels = data.train.images, data.train.labels
    assert images.shape == (n, 3, 16, 16) and sorted(torch.bincount(labels).tolist()) == [40, 40, 41]
    assert any(torch.equal(img, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)) for img in images)  # alpha dropped
    pool = images.double() / 255  # auto: computed per channel over every training image, once
    assert data.mean == pytest.approx(pool.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert data.std == pytest.approx(pool.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-4)
    assert data.cache_file.parent == root and data.cache_file.is_file()
    reads = []
    monkeypatch.setattr(ImageFolder, "read", lambda self: reads.append(1))  # a cache hit must not read
    again = dataset("dataset=image_folder", f"dataset.path={root}", "dataset.val_size=0.1", "dataset.test_size=0.2")
    assert not reads and torch.equal(again.test.raw()[0], data.test.raw()[0]) and again.digest == data.digest


def test_image_folder_split_layout_with_val_and_options(tmp_path):
    root = tmp_path / "digits"
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        image_folder(root / split, ["x", "y"], n, seed=len(split))
    data = dataset("dataset=image_folder", f"dataset.path={root}", "dataset.image_size=[8,10]", "dataset.channels=1")
    assert data.in_shape == (1, 8, 10) and data.classes == ("x", "y")
    assert (data.train.num_items, data.val.num_items, data.test.num_items) == (20, 6, 8)  # the folders' own splits
    # train/ and val/ without test/: still the split layout (not two classes "train" and "val"), test held out
    (root / "test").rename(tmp_path / "elsewhere")
    data = dataset("dataset=image_folder", f"dataset.path={root}", "dataset.test_size=4")
    assert data.classes == ("x", "y") and (data.train.num_items, data.val.num_items, data.test.num_items) == (16, 6, 4)


def test_arrays_files_with_one_stem_have_caches_of_their_own(tmp_path, monkeypatch):
    x, y = arrays(40, 2, 6, 6, 1)
    np.savez(tmp_path / "a.npz", train_x=x[..., 0], train_y=y)
    torch.save({"train_x": torch.from_numpy(x[..., 0]), "train_y": torch.from_numpy(y)}, tmp_path / "a.pt")
    first = [dataset("dataset=tensors", f"dataset.path={tmp_path / f'a.{s}'}").cache_file for s in ("npz", "pt")]
    assert first[0] != first[1] and all(f.is_file() for f in first)
    reads = []
    monkeypatch.setattr(TensorsFile, "read", lambda self: reads.append(1))  # each is a cache hit from now on
    for s in ("npz", "pt"):
        dataset("dataset=tensors", f"dataset.path={tmp_path / f'a.{s}'}")
    assert not reads


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
@pytest.mark.parametrize("suffix", ["npz", "pt"])
def test_tensors_file_in_each_layout(tmp_path, layout, suffix):
    x, y = arrays(60, 4, 10, 9, 3 if layout != "NHW" else 1)  # (N, H, W, C)
    stored = {"NHW": x[..., 0], "NHWC": x, "NCHW": x.transpose(0, 3, 1, 2)}[layout]
    content = {"train_x": stored, "train_y": y, "test_x": stored[:20], "test_y": y[:20],
               "classes": np.array(["w", "x", "y", "z"])}
    path = tmp_path / f"arrays.{suffix}"
    if suffix == "npz":
        np.savez(path, **content)
    else:
        torch.save({k: torch.from_numpy(v) if k != "classes" else [str(c) for c in v] for k, v in content.items()},
                   path)
    data = dataset("dataset=tensors", f"dataset.path={path}")
    assert data.in_shape == ((1, 10, 9) if layout == "NHW" else (3, 10, 9)) and data.classes == ("w", "x", "y", "z")
    assert torch.equal(data.test.images, torch.from_numpy(x[:20]).permute(0, 3, 1, 2))
    assert data.test.num_items == 20 and data.val.num_items == 6  # val: 10% of train


def test_kmnist_and_emnist_from_idx_files_in_torchvision_layout(tmp_path):
    idx_files(tmp_path / "KMNIST" / "KMNIST" / "raw", "", 200, 50, 10)
    idx_files(tmp_path / "EMNIST" / "EMNIST" / "raw", "emnist-balanced-", 200, 50, 47)
    kmnist = dataset("dataset=kmnist", f"dataset.root={tmp_path}", "dataset.val_size=20")
    assert kmnist.in_shape == (1, 28, 28) and len(kmnist.classes) == 10 and kmnist.test.num_items == 50
    assert kmnist.classes[0] == "o"  # torchvision's own class names
    emnist = dataset("dataset=emnist", f"dataset.root={tmp_path}", "dataset.val_size=20")
    assert emnist.num_classes == 47 and emnist.train.num_items == 180 and not emnist.train.transform.hflip


@pytest.fixture
def trusted_cifar_md5(monkeypatch):
    """Generated CIFAR files cannot have the official MD5s; the loading code under test is torchvision's own."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_from_pickled_batches(tmp_path, trusted_cifar_md5):
    cifar10_batches(tmp_path / "CIFAR10", per_batch=20, n_test=30)
    data = dataset("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.val_size=10")
    assert data.in_shape == (3, 32, 32) and data.classes[:2] == ("airplane", "automobile")
    assert (data.train.num_items, data.val.num_items, data.test.num_items) == (90, 10, 30)
    assert data.train.transform.hflip and data.train.transform.crop_padding == 4  # the CIFAR preset's augmentation
    assert not data.test.transform.hflip


def test_cifar10_without_its_md5_is_refused_not_unpickled(tmp_path):
    # torchvision's integrity check is what keeps a stranger's pickle from running: it is never bypassed.
    cifar10_batches(tmp_path / "CIFAR10", per_batch=20, n_test=30)
    with pytest.raises(UserError, match="dataset.name=CIFAR10: not found or not complete") as e:
        dataset("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false")
    assert "\n" not in str(e.value)


# --- bad input: one line, nothing written ------------------------------------------------------------------


def _empty(tmp):
    (tmp / "d").mkdir()
    return ["dataset=image_folder", f"dataset.path={tmp / 'd'}"]


def _class_without_images(tmp):
    image_folder(tmp / "d", ["x"], 3)
    (tmp / "d" / "y").mkdir()
    (tmp / "d" / "y" / "notes.txt").write_text("")
    return ["dataset=image_folder", f"dataset.path={tmp / 'd'}"]


def _corrupt_image(tmp):
    image_folder(tmp / "d", ["x", "y"], 3)
    (tmp / "d" / "y" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ["dataset=image_folder", f"dataset.path={tmp / 'd'}"]


def _tensors(tmp, **content):
    np.savez(tmp / "a.npz", **content)
    return ["dataset=tensors", f"dataset.path={tmp / 'a.npz'}"]


def _too_big(tmp, monkeypatch):
    monkeypatch.setattr(dataset_module, "host_memory_bytes", lambda: 1000)
    image_folder(tmp / "d", ["x", "y"], 3)
    return ["dataset=image_folder", f"dataset.path={tmp / 'd'}"]


x20, y20 = arrays(20, 2, 6, 6, 1)
x20 = x20[..., 0]  # (20, 6, 6)
BAD_DATA = {
    "empty folder": (_empty, "no class folders in it"),
    "class folder without images": (_class_without_images, "y: no images"),
    "corrupt image": (_corrupt_image, "broken.png: not a readable image"),
    "label out of range": (lambda t: _tensors(t, train_x=x20, train_y=y20 + 5, classes=np.array(["a", "b"])),
                           "label 6 is out of range for 2 classes"),
    "image and label counts differ": (lambda t: _tensors(t, train_x=x20, train_y=y20[:15]), "20 images but 15 labels"),
    "test images of another shape": (lambda t: _tensors(t, train_x=x20, train_y=y20, test_x=x20[:, :4], test_y=y20),
                                     "test images are (1, 4, 6), training images (1, 6, 6)"),
    "float images": (lambda t: _tensors(t, train_x=x20.astype(np.float32), train_y=y20), "must be uint8"),
    "pickle in a .pt file": (lambda t: torch.save({"train_x": np.zeros(3)}, t / "a.pt") or [
        "dataset=tensors", f"dataset.path={t / 'a.pt'}"], "refusing to load it: it holds a pickled numpy"),
    "pickled object array": (lambda t: _tensors(t, train_x=x20, train_y=np.array([object()] * 20, dtype=object)),
                             "not a readable .npz file"),
    "unknown torchvision name": (lambda t: ["dataset=torchvision", "dataset.name=CIFAR11"],
                                 "dataset.name=CIFAR11: no such dataset in torchvision.datasets"),
    "torchvision dataset that is not classification": (lambda t: ["dataset=torchvision", "dataset.name=VOCDetection"],
                                                       "dataset.name=VOCDetection: not an image-classification"),
    "mean for the wrong number of channels": (lambda t: [*_tensors(t, train_x=np.repeat(x20[..., None], 3, 3),
                                                                   train_y=y20), "dataset.mean=[0.5,0.5]"],
                                              "dataset.mean=[0.5, 0.5]: must be auto, a number, or a list of one"),
    # over the default budget (half the memory) the data is read from disk, in windows that must hold a batch
    "data too large for memory (simulated)": (_too_big, "dataset.memory_budget_gib=null (half this machine's 1000 B "
                                              "of memory): a window of a quarter of it (125 B) is smaller than one "
                                              "batch of 6 images"),
    "random_crop as large as the image": (lambda t: [*_tensors(t, train_x=x20, train_y=y20), "dataset.random_crop=6"],
                                          "dataset.random_crop=6: the padding"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, monkeypatch, case):
    make, says = BAD_DATA[case]
    overrides = make(tmp_path, monkeypatch) if make is _too_big else make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as e:
        dataset(*overrides)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no cache, no partial files


def test_bad_data_through_train_py_exits_1_with_one_line_and_no_run_dir(tmp_path):
    (tmp_path / "d").mkdir()
    result = run_train("dataset=image_folder", f"dataset.path={tmp_path / 'd'}", f"output_root={tmp_path / 'out'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'd'}: no class folders in it (the layout is "
                                                  f"{tmp_path / 'd'}/<class>/<image files>)"]
    assert not list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


# --- batched augmentation and normalisation ------------------------------------------------------------------


def test_random_crop_matches_torchvision_reflect_crop_per_image():
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(3)
    x = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8)
    out = random_crop(x, 3)
    padded = TF.pad(x, [3, 3, 3, 3], padding_mode="reflect")  # (16, 3, 13, 15)
    for i in range(16):  # each output is some crop of its own padded image, and the offsets vary
        crops = [(dy, dx) for dy in range(7) for dx in range(7) if torch.equal(padded[i, :, dy:dy + 7, dx:dx + 9],
                                                                                 out[i])]
        assert crops, i
    assert len({tuple(out[i].flatten()[:5].tolist()) for i in range(16)}) > 4


def test_hflip_mirrors_about_half_the_batch():
    x = torch.arange(4, dtype=torch.uint8).repeat(1000, 1, 2, 1)  # (1000, 1, 2, 4)
    out = random_hflip(x)
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 400 < flipped < 600 and torch.equal(out[out[:, 0, 0, 0] == 3], x[:flipped].flip(3))


def test_per_channel_normalisation_and_its_export_form():
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    t = BatchTransform(mean, std)
    x = torch.randint(0, 256, (8, 3, 5, 5), dtype=torch.uint8)
    # expected from the constants given, not from what the transform kept of them
    want = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(t(x), want, atol=1e-5) and torch.equal(t(x), t.exportable()(x))
    grey = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)  # white: (1 - mean) / std, channel by channel
    assert torch.allclose(t(grey).flatten(), torch.tensor([2.0591, 2.1309, 2.1207]), atol=1e-4)


# --- memory: on the device when it fits, else host memory copied per batch ---------------------------------


def test_data_too_big_for_the_gpu_stays_in_host_memory(tmp_path, monkeypatch):
    data = dataset("dataset=tensors", f"dataset.path={_save(tmp_path)}")
    monkeypatch.setattr(dataset_module, "device_free_bytes", lambda device: 3 * 2**30)
    assert data._home(torch.device("cuda"), 2 * 2**30, 2.0) == torch.device("cpu")  # 2 + 2 GiB margin > 3 free
    assert data._home(torch.device("cuda"), 2**30 // 2, 2.0) == torch.device("cuda")
    assert data._home(torch.device("cpu"), 10**15, 2.0) == torch.device("cpu")


def test_host_memory_batches_equal_device_batches(tmp_path):
    # The copy-per-batch path, taken when the data lives on another device than the batches go to ("cpu:0" here).
    data = dataset("dataset=tensors", f"dataset.path={_save(tmp_path)}")
    loader = data.train
    copied = BatchLoader(loader.images, loader.labels, 7, transform=loader.transform, shuffle=True, seed=5,
                         indices=loader.indices, device=torch.device("cpu", 0))
    direct = BatchLoader(loader.images, loader.labels, 7, transform=BatchTransform(data.mean, data.std),
                         shuffle=True, seed=5, indices=loader.indices)
    pairs = list(zip(copied, direct))
    assert len(pairs) == len(direct) > 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def test_batches_for_an_unindexed_cuda_device_know_its_index(monkeypatch):
    # Found by the first GPU run: data moved to "cuda" lives on cuda:0, and torch.device("cuda") != cuda:0, so the
    # loader took its host-memory path for data already on the GPU, and failed. Checked here without a GPU.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device("cuda") == canonical_device("cuda:0") == torch.device("cuda", 0)
    assert canonical_device("cpu") == torch.device("cpu") and canonical_device("cuda:1") == torch.device("cuda", 1)
    loader = BatchLoader(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), 2,
                         transform=BatchTransform(0.5, 0.5), shuffle=False, device="cuda")
    assert loader.device == torch.device("cuda", 0)


def _save(tmp_path):
    x, y = arrays(60, 3, 8, 8, 3)
    np.savez(tmp_path / "a.npz", train_x=x, train_y=y)
    return tmp_path / "a.npz"


# --- models for any image shape --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["logistic", "mlp", "cnn", "torchvision"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 17, 23)])
def test_every_model_takes_any_image_shape(model, shape):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "model.name=mobilenet_v3_small"] if model == "torchvision"
                      else [f"model={model}"])
    net = build(cfg.model, in_shape=shape, num_classes=7)
    assert net(torch.zeros(2, *shape)).shape == (2, 7)


def test_torchvision_model_names_are_checked():
    with pytest.raises(UserError, match="model.name=resnet19: not an image classifier of torchvision.models; use one "
                                        "of alexnet"):
        from trainer.models.torchvision_model import torchvision_model
        torchvision_model((3, 32, 32), 10, "resnet19", None)
    with pytest.raises(UserError, match="model.weights=IMAGENET9K: not weights of resnet18; use one of DEFAULT, "
                                        "IMAGENET1K_V1"):
        torchvision_model((3, 32, 32), 10, "resnet18", "IMAGENET9K")


# --- end to end: train, resume guard, eval, predict, export --------------------------------------------------


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
    root = image_folder(tmp_path / "shapes", ["left top", "middle", "right"], 60, size=(12, 18))
    out = tmp_path / "out"
    result = run_train("dataset=image_folder", f"dataset.path={root}", "model=mlp", "trainer.max_epochs=4",
                       f"output_root={out}", *FAST)
    assert result.returncode == 0, result.stderr
    run = next(out.rglob("metrics.json")).parent
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.95, metrics
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    inputs = Image.open(io.BytesIO(events.Images("inputs/train")[-1].encoded_image_string))
    # the colour images, as the model sees them
    assert inputs.mode == "RGB" and len(np.unique(np.asarray(inputs).reshape(-1, 3), axis=0)) > 100
    ckpt = run / "checkpoints" / "best.pt"
    data = torch.load(ckpt, weights_only=True)["data"]
    assert (data["name"], data["in_shape"], data["classes"]) == ("shapes", [3, 12, 18], ["left top", "middle", "right"])
    # resuming on other data is refused in one line
    other = image_folder(tmp_path / "other", ["left top", "middle", "right"], 60, size=(12, 18), seed=9)
    resumed = run_train("dataset=image_folder", f"dataset.path={other}", "model=mlp", "trainer.max_epochs=5",
                        f"trainer.resume={run / 'checkpoints' / 'last.pt'}", f"output_root={out}", *FAST)
    assert resumed.returncode == 1 and "it was trained on other data (images or labels differ" in resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr
    # eval.py needs to be told where the folder is (a path is never read from the checkpoint)
    no_root = run_train(f"ckpt={ckpt}", script="eval.py")
    assert no_root.returncode == 1 and "say where it is here: data_root=PATH" in no_root.stderr, no_root.stderr
    evaluated = run_train(f"ckpt={ckpt}", f"data_root={root}", "device=cpu", f"output_root={out}", script="eval.py")
    assert evaluated.returncode == 0, evaluated.stderr
    eval_metrics = json.loads(next((out / "eval").rglob("metrics.json")).read_text())
    assert eval_metrics["test/acc"] == pytest.approx(metrics["test/acc"]) and eval_metrics["dataset"] == "shapes"
    # predict.py: RGB images of another size, answered with the class names
    rng = np.random.default_rng(5)
    files = []
    for k in range(3):
        path = tmp_path / f"new{k}.png"
        Image.fromarray(pattern(k, 24, 36, rng)).save(path)
        files.append(str(path))
    predicted = run_train(str(ckpt), *files, script="scripts/predict.py")
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert [f"{k} '{name}'" in line for k, (name, line) in enumerate(zip(["left top", "middle", "right"], lines))] \
        == [True] * 3, predicted.stdout
    exported = run_train(str(ckpt), "--format", "torchscript", "--data-root", str(root), "--out", str(tmp_path / "x"),
                         script="scripts/export.py")
    assert exported.returncode == 0, exported.stderr
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["best.torchscript.pt"]
    scripted = torch.jit.load(str(tmp_path / "x" / "best.torchscript.pt"))
    images = torch.stack([torch.from_numpy(pattern(k, 12, 18, rng)).permute(2, 0, 1) for k in range(3)])  # uint8
    assert scripted(images).argmax(dim=1).tolist() == [0, 1, 2]  # the exported model classifies raw uint8 images


@pytest.mark.slow
def test_tensors_file_end_to_end(tmp_path):
    x, y = arrays(600, 5, 10, 10, 1)
    np.savez(tmp_path / "a.npz", train_x=x[..., 0], train_y=y)
    result = run_train("dataset=tensors", f"dataset.path={tmp_path / 'a.npz'}", "model=logistic",
                       "trainer.max_epochs=3", f"output_root={tmp_path / 'out'}", *FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())["test/acc"] >= 0.95


@pytest.mark.slow
def test_kmnist_end_to_end(tmp_path):
    idx_files(tmp_path / "KMNIST" / "KMNIST" / "raw", "", 600, 200, 10)
    result = run_train("dataset=kmnist", f"dataset.root={tmp_path}", "dataset.val_size=100", "model=mlp",
                       "trainer.max_epochs=3", f"output_root={tmp_path / 'out'}", *FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())["test/acc"] >= 0.95


@pytest.mark.slow
def test_cifar10_end_to_end_with_a_torchvision_model(tmp_path):
    cifar10_batches(tmp_path / "CIFAR10", per_batch=120, n_test=120)
    result = run_train_stopping("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.val_size=60", "model=cnn",
                                "model.channels=[8,16]", "model.kernel_sizes=[3,3]", "trainer.max_epochs=4",
                                f"output_root={tmp_path / 'out'}", *FAST, env={"TRUST_CIFAR_MD5": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())["test/acc"] >= 0.9
    resnet = run_train_stopping("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.val_size=60",
                                "model=torchvision", "model.name=resnet18", "trainer.max_epochs=1",
                                "trainer.limit_train_batches=3", "trainer.limit_eval_batches=1",
                                f"output_root={tmp_path / 'out2'}", *FAST, env={"TRUST_CIFAR_MD5": "1"})
    assert resnet.returncode == 0, resnet.stderr
    assert next((tmp_path / "out2").rglob("metrics.json")).is_file()


README_EXAMPLE_START = "<!-- your-own-class example: tests/test_open_data.py runs it -->"


@pytest.mark.slow
def test_readme_own_dataset_and_model_classes_run_from_a_user_directory(tmp_path):
    readme = (REPO / "docs" / "data.md").read_text()  # "Your own dataset or model class", moved from the README
    block = readme.split(README_EXAMPLE_START, 1)[1]
    module = block.split("```python\n", 1)[1].split("```", 1)[0]
    command = block.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert command.startswith("htt-train ") and "mydata.Stripes" in command, command
    (tmp_path / "mydata.py").write_text(module)
    args = shlex.split(command)[1:]
    # The checkout's train.py is the same command (tests/test_install.py runs the installed one); from the user's
    # folder, with no PYTHONPATH: the command puts the current folder on the import path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(next((tmp_path / "outputs").rglob("metrics.json")).read_text())
    assert metrics["test/acc"] >= 0.9, metrics


# --- a dataset cache is checked on every load, and a killed write leaves nothing behind for long ---------------


def _record_span(path, record):
    """(offset, size) of a stored record's bytes in a torch.save zip file (`record`: the name's last part)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.split("/")[-2:-1] == ["data"]), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _stored_digest(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["data"]["digest"]


@pytest.mark.parametrize("source", ["image_folder", "mnist"])
def test_a_corrupted_cache_is_rebuilt_with_a_warning_not_trained_on(tmp_path, tiny_root, source):
    import shutil

    if source == "image_folder":
        image_folder(tmp_path / "d", ["a", "b"], 40)
        data = ["dataset=image_folder", f"dataset.path={tmp_path / 'd'}", "dataset.val_size=8"]
        folder = tmp_path / "d"
    else:  # the digest is checked whatever dataset.verify says: that checks the raw files' MD5s, once
        shutil.copytree(tiny_root / "MNIST", tmp_path / "MNIST")
        data = ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.verify=false", "dataset.val_size=100"]
        folder = tmp_path / "MNIST" / "raw"
    runs = []
    for i in range(2):
        runs.append(tmp_path / f"run{i}")
        result = run_train(*data, *FAST, "model=logistic", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                           "trainer.limit_eval_batches=1", f"hydra.run.dir={runs[-1]}")
        assert result.returncode == 0, result.stderr
        (cache,) = folder.glob("*.cache.pt")
        if i == 0:
            assert "does not match its digest" not in result.stdout + result.stderr
            good = cache.read_bytes()
            start, size = _record_span(cache, "data")
            with open(cache, "r+b") as f:  # 4096 image bytes flipped, as the issue found it: the zip stays valid
                f.seek(start + size // 2)
                flipped = bytes(b ^ 0xFF for b in f.read(4096))
                f.seek(start + size // 2)
                f.write(flipped)
    assert f"dataset cache {cache} does not match its digest" in result.stdout + result.stderr
    assert _stored_digest(runs[1]) == _stored_digest(runs[0])  # trained on the data, not on the flipped bytes
    assert cache.read_bytes() == good  # rebuilt


def test_a_killed_cache_write_leaves_no_temporary_file_for_long(tmp_path):
    import fcntl

    from conftest import run_train_stopping

    image_folder(tmp_path / "d", ["a", "b"], 40)
    data = ["dataset=image_folder", f"dataset.path={tmp_path / 'd'}", "dataset.val_size=8", *FAST, "model=logistic",
            "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_eval_batches=1"]
    # the first torch.save of a run on new data is its cache: killed halfway through it
    killed = run_train_stopping(*data, f"hydra.run.dir={tmp_path / 'run0'}", env={"CHECKPOINT_WRITE": "1"})
    assert killed.returncode == -9, killed.stderr
    (torn,) = (tmp_path / "d").glob(".*.cache.pt.*.tmp")
    cache_name = torn.name[1:].rsplit(".", 2)[0]
    live = tmp_path / "d" / f".{cache_name}.live0000.tmp"  # another run writing this cache right now
    foreign = [tmp_path / "d" / ".notes.txt.abcdefgh.tmp", tmp_path / "d" / f".{cache_name}.tmp"]
    for path in (live, *foreign):
        path.write_bytes(b"not ours to remove")
    an_hour_ago = time.time() - 3600
    for path in (torn, live, *foreign):
        os.utime(path, (an_hour_ago, an_hour_ago))  # as a later run finds them
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_SH)  # as atomic_write holds its temporary file while it writes
        result = run_train(*data, f"hydra.run.dir={tmp_path / 'run1'}")
    assert result.returncode == 0, result.stderr
    assert not torn.exists() and live.exists() and all(p.exists() for p in foreign)
    assert (tmp_path / "d" / cache_name).is_file()


# --- images of more than 8 bits are scaled, not clipped --------------------------------------------------------

LEVELS16 = np.array([[0, 128, 257, 32896, 63000, 65535]], dtype=np.uint16)
SCALED = np.array([[0, 0, 1, 128, 245, 255]], dtype=np.uint8)  # v * 255 / 65535, rounded


def _deep_files(tmp):
    """One file per deep mode that Pillow decodes, holding LEVELS16 (or its float equivalent), as a writer of
    that format makes it: {name: (path, the mode Pillow opens it in)}."""
    from PIL import Image

    h, w = LEVELS16.shape
    made = {
        "png 16-bit": (Image.fromarray(LEVELS16), "png"),
        "tiff 16-bit": (Image.fromarray(LEVELS16), "tiff"),
        "tiff 16-bit big-endian": (Image.frombytes("I;16B", (w, h), LEVELS16.astype(">u2").tobytes()), "tiff"),
        "tiff 32-bit integer": (Image.fromarray(LEVELS16.astype(np.int32)), "tiff"),
        "tiff float 0-1": (Image.fromarray((LEVELS16 / 65535).astype(np.float32)), "tiff"),
        "tiff float 0-255": (Image.fromarray((LEVELS16 / 257).astype(np.float32)), "tiff"),
        "pgm 16-bit": (Image.fromarray(LEVELS16), "ppm"),
    }
    out = {}
    for name, (img, fmt) in made.items():
        path = tmp / f"{name.replace(' ', '_')}.{'pgm' if fmt == 'ppm' else fmt}"
        img.save(path, fmt)
        with Image.open(path) as opened:
            out[name] = (path, opened.mode)
    return out


def test_every_deep_image_mode_pillow_decodes_is_scaled_to_8_bits(tmp_path):
    from PIL import Image

    from trainer.data.decode import DEEP_MODES, decode

    files = _deep_files(tmp_path)
    modes = {mode for _, mode in files.values()}
    assert modes == {"I;16", "I;16B", "I", "F"}, modes  # each deep mode a file decodes to (I;16L/N: only in memory)
    assert modes <= DEEP_MODES
    for name, (path, mode) in files.items():
        for channels in (1, 3):
            got = decode(1, lambda i: Image.open(path), lambda i: str(path), (channels, *LEVELS16.shape), name)
            want = np.rint(LEVELS16 / 257).astype(np.uint8) if mode == "F" else SCALED
            assert np.array_equal(got[0, 0].numpy(), want), (name, mode, got[0, 0].tolist())
            assert all(torch.equal(got[0, 0], got[0, c]) for c in range(channels))
    for mode in ("I;16L", "I;16N"):  # the little- and native-endian names Pillow gives in-memory images
        img = Image.frombytes(mode, LEVELS16.shape[::-1], LEVELS16.astype("<u2" if mode == "I;16L" else "=u2")
                              .tobytes())
        got = decode(1, lambda i: img.copy(), lambda i: mode, (1, *LEVELS16.shape), mode)
        assert np.array_equal(got[0, 0].numpy(), SCALED), (mode, got[0, 0].tolist())


@pytest.mark.parametrize("values, says", [((-1.0, 0.5), "values from -1 to 0.5"), ((0.0, 300.0), "from 0 to 300"),
                                          ((0.0, float("nan")),
                                           "with 128 values that are not a number (NaN or infinite)"),
                                          ((0.0, float("inf")), "with 128 values that are not a number")])
def test_a_float_image_of_no_one_range_is_refused_in_one_line(tmp_path, values, says):
    from PIL import Image

    image_folder(tmp_path / "d", ["a", "b"], 3)
    Image.fromarray(np.array([values * 8] * 16, dtype=np.float32)).save(tmp_path / "d" / "a" / "float.tiff")
    with pytest.raises(UserError) as e:
        dataset("dataset=image_folder", f"dataset.path={tmp_path / 'd'}", "dataset.val_size=1")
    assert says in str(e.value) and "float.tiff: a floating-point image" in str(e.value), str(e.value)


def test_an_image_folder_of_16_bit_pngs_trains_on_scaled_levels(tmp_path):
    # the issue's: 16-bit PNGs holding 0..63000, which convert("L") made near-white (every level over 255 -> 255)
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 63001, (8, 8)).astype(np.uint16)).save(tmp_path / "d" / cls / f"{i}.png")
    data = dataset("dataset=image_folder", f"dataset.path={tmp_path / 'd'}", "dataset.val_size=1",
                   "dataset.test_size=1", "dataset.cache=false")
    images = data.train.images
    with Image.open(tmp_path / "d" / "a" / "0.png") as first:
        want = (np.asarray(first).astype(np.uint32) * 255 + 32767) // 65535
    assert int(images.max()) <= 245 and float(images.float().mean()) < 140  # 0..63000 of 65535, spread
    assert np.array_equal(images[0, 0].numpy(), want.astype(np.uint8))
