"""A file from elsewhere is refused within a few seconds and a bounded amount of memory, whatever its content.

Each case crafts a file the way a review found it (issue 24), from a real checkpoint that `train.py` wrote on tiny
data and in torch's own zip format, and runs the command a user would (eval.py, scripts/predict.py,
scripts/export.py, train.py, scripts/summarize.py) as a fresh process under tests/bounded.py's watchdog. Each
must exit 1 with one `error: ...` line, peak below BOUND_MIB above the baseline of a process that only imports
torch and the package, within SECONDS. Before the fixes, each of these was killed at 6 GB or hung.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bounded import REPO, baseline_mib, run_bounded
from conftest import MLP, TINY, run_train

from trainer.errors import UserError
from trainer.run.checkpoint import load_checkpoint

BOUND_MIB = 512  # above baseline_mib(): what a refusal may cost
CAP_MIB = 2048  # above baseline_mib(): where the watchdog kills an unrefused bomb (so the old code fails, not the CI)
SECONDS = 20  # a fresh process spends 5-8 s of this importing torch and Hydra on a shared 2-core machine


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory) -> Path:
    """last.pt of a real one-epoch MLP run on tiny MNIST-layout data."""
    run_dir = tmp_path_factory.mktemp("bounded") / "run"
    result = run_train(*TINY, *MLP, f"dataset.root={tiny_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=2", "trainer.limit_eval_batches=1", *RESUME[-1:])
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoints" / "last.pt"


RESUME = [str(REPO / "train.py"), *TINY, *MLP, "scheduler=none"]  # the trained run's own options


def crafted(trained: Path, path: Path, change=None, config=None, **replace) -> Path:
    """The trained checkpoint with `replace`d entries, its parsed config changed by `config(dict)`, and the whole
    state by `change(state)`, saved again by torch.save (the format this code reads)."""
    state = torch.load(trained, map_location="cpu", weights_only=True)
    state.update(replace)
    if config is not None:
        parsed = yaml.safe_load(state["config"])
        config(parsed)
        state["config"] = yaml.safe_dump(parsed)
    if change is not None:
        change(state)
    torch.save(state, path)
    return path


def refused(argv: list[str], says: str, env: dict[str, str] | None = None) -> str:
    """Run `python ARGV...` bounded; assert exit 1, one `error:` line containing `says`, memory and time bounds."""
    base = baseline_mib()
    done = run_bounded(argv, cap_mib=base + CAP_MIB, timeout=60, env=env)
    line = done.one_line()
    assert says in line, line
    assert done.peak_mib < base + BOUND_MIB, f"peak {done.peak_mib:.0f} MiB, baseline {base:.0f} MiB: {line}"
    assert done.seconds < SECONDS, f"{done.seconds:.1f} s: {line}"
    print(f"{argv[0]}: {done.peak_mib - base:+.0f} MiB above baseline, {done.seconds:.1f} s: {line[:160]}")
    return line


def consumers(ckpt: Path, tmp_path: Path, image: Path) -> dict[str, list[str]]:
    return {"eval": [str(REPO / "eval.py"), f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
            "predict": [str(REPO / "scripts" / "predict.py"), str(ckpt), str(image)],
            "export": [str(REPO / "scripts" / "export.py"), str(ckpt), "--out", str(tmp_path / "exports")]}


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image
    path = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path)
    return path


# --- item 1: sizes stored in a checkpoint, bounded before anything is built ---------------------------------------

@pytest.mark.parametrize("consumer", ["eval", "predict", "export"])
def test_a_billion_unit_mlp_is_refused_before_it_is_built(trained, tmp_path, image, consumer):
    ckpt = crafted(trained, tmp_path / "huge.pt", config=lambda c: c["model"].update(hidden_sizes=[1_000_000_000]))
    refused(consumers(ckpt, tmp_path, image)[consumer], "its weights do not fit the model its config describes")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "exports").exists()


def test_a_stored_image_shape_of_ten_billion_pixels_is_refused(trained, tmp_path, image):
    from trainer.models.logistic import LogisticRegression

    def logistic(state):
        state["choices"]["model"] = "logistic"
        state["model"] = LogisticRegression((1, 28, 28), 10).state_dict()
        state["data"]["in_shape"] = [1, 100_000, 100_000]

    ckpt = crafted(trained, tmp_path / "wide.pt", logistic,
                   config=lambda c: c.update(model={"_target_": "trainer.models.logistic.LogisticRegression"}))
    refused(consumers(ckpt, tmp_path, image)["predict"], "stored image shape [1, 100000, 100000]")


def test_two_million_class_names_are_refused(trained, tmp_path, image):
    def classes(state):
        state["data"]["classes"] = [f"c{i}" for i in range(2_000_000)]

    refused(consumers(crafted(trained, tmp_path / "classes.pt", classes), tmp_path, image)["predict"],
            "its pickle ('classes/data.pkl') is 33.3 MiB; a torch.save file's is at most 8 MiB")


def test_more_classes_than_any_dataset_has_are_refused_however_short_their_names(trained, tmp_path):
    from trainer.run.untrusted import MAX_CLASSES

    def classes(state):
        state["data"]["classes"] = [""] * (MAX_CLASSES + 1)  # a pickle of a few hundred KB

    with pytest.raises(UserError, match=f"it stores {MAX_CLASSES + 1} class names; at most {MAX_CLASSES}"):
        load_checkpoint(crafted(trained, tmp_path / "classes.pt", classes))


@pytest.mark.parametrize("consumer", ["eval", "predict", "export"])
def test_a_pickle_that_refers_to_one_list_a_billion_times_is_refused_in_bounds(trained, tmp_path, image, consumer):
    """7 KB of pickle: a list of 1000 references to a list of 1000 references to a list of 1000 values. A walk
    that follows every reference meets 10^9 values: the check of tensors ran for minutes and gigabytes."""
    leaf = [0] * 1000
    middle = [leaf] * 1000
    ckpt = crafted(trained, tmp_path / "refs.pt", lambda state: state["data"].update(classes=[middle] * 1000))
    assert ckpt.stat().st_size < 1 << 20
    refused(consumers(ckpt, tmp_path, image)[consumer], "class names")


def test_a_pickle_of_millions_of_references_is_refused_in_bounds(trained, tmp_path, image):
    """7 MB of pickle (under the 8 MiB cap): one small list referred to 1.5 million times, each a value to check."""
    ckpt = crafted(trained, tmp_path / "wide.pt", lambda state: state.update(extra=[[0]] * 1_500_000))
    refused(consumers(ckpt, tmp_path, image)["eval"], "values (a checkpoint holds a few thousand")


def test_a_resnet_for_8000x8000_images_is_refused_before_its_trial_forward_pass(trained, tmp_path, image):
    from trainer.models.torchvision_model import torchvision_model

    def resnet(state):
        state["choices"]["model"] = "torchvision"
        state["model"] = torchvision_model((3, 32, 32), 10, "resnet18", None).state_dict()
        state["data"].update(in_shape=[3, 8000, 8000], mean=[0.5] * 3, std=[0.25] * 3)

    ckpt = crafted(trained, tmp_path / "resnet.pt", resnet, config=lambda c: c.update(
        model={"_target_": "trainer.models.torchvision_model.torchvision_model", "name": "resnet18", "weights": None}))
    refused(consumers(ckpt, tmp_path, image)["predict"], "stored image shape [3, 8000, 8000]")


def test_a_billion_unit_mlp_on_the_command_line_is_refused_within_10_s(tiny_root, tmp_path):
    line = refused([str(REPO / "train.py"), *TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / 'run'}",
                    "model=mlp", "model.hidden_sizes=[1000000000]"], "model=MLP of 795,000,000,010 weights needs")
    assert "of memory available here" in line and not (tmp_path / "run").exists()


def test_a_model_whose_weights_fit_but_whose_training_does_not_is_refused_before_it_is_built(tiny_root, tmp_path):
    """Weights of half the memory available: they fit, but training holds them 4 times (gradients, Adam's moments)."""
    from trainer.system import available_memory_bytes

    width = int(math.sqrt(available_memory_bytes() / 8))  # 4 bytes x width^2 ~ half the memory available
    line = refused([str(REPO / "train.py"), *TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / 'run'}",
                    "model=mlp", f"model.hidden_sizes=[{width},{width}]"], "trained (the weights, their gradients")
    assert "4 copies), needs" in line and not (tmp_path / "run").exists()


# --- item 3: a zip bomb, refused from the zip directory before torch.load inflates it -----------------------------

@pytest.fixture(scope="module")
def bomb(trained, tmp_path_factory) -> Path:
    """The trained checkpoint with a storage record deflated, inflating to 1 GiB (a 1 MB file)."""
    path = tmp_path_factory.mktemp("bomb") / "last.pt"
    with zipfile.ZipFile(trained) as source, zipfile.ZipFile(path, "w") as out:
        for record in source.infolist():
            data = source.read(record)
            if not record.filename.endswith("/data/0"):
                out.writestr(record, data)
                continue
            info = zipfile.ZipInfo(record.filename)  # a storage torch.load reads, so inflates whole
            info.compress_type = zipfile.ZIP_DEFLATED
            with out.open(info, "w", force_zip64=True) as f:
                f.write(data)
                for _ in range(16):
                    f.write(bytes(64 << 20))
    assert path.stat().st_size < 2 << 20
    return path


def test_a_zip_bomb_checkpoint_is_refused_before_it_is_inflated(bomb, tmp_path, tiny_root):
    for argv in ([str(REPO / "eval.py"), f"ckpt={bomb}", f"hydra.run.dir={tmp_path / 'eval'}"],
                 [*RESUME, f"dataset.root={tiny_root}", f"trainer.resume={bomb}",
                  f"hydra.run.dir={tmp_path / 'run'}"]):
        refused(argv, "/data/0' is compressed")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()


def test_summarize_reads_a_stopped_run_whose_last_pt_is_a_zip_bomb_in_bounded_memory(trained, bomb, tmp_path):
    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- model=mlp\n")
    os.link(bomb, run / "checkpoints" / "last.pt")
    base = baseline_mib()
    done = run_bounded([str(REPO / "scripts" / "summarize.py"), str(tmp_path / "outputs")], cap_mib=base + CAP_MIB)
    assert done.returncode == 0 and not done.killed_over_cap, done.stderr
    assert done.peak_mib < base + BOUND_MIB and done.seconds < SECONDS, (done.peak_mib, base, done.seconds)
    print(f"summarize.py: {done.peak_mib - base:+.0f} MiB above baseline, {done.seconds:.1f} s")


# --- item 4: a tensor that is a view of far more elements than it stores -----------------------------------------

def test_a_zero_stride_rng_state_is_refused_on_resume(trained, tmp_path, tiny_root):
    def zero_stride(state):  # 2 x 10^9 bytes, all one stored byte: set_rng_state would copy them
        state["rng"]["torch"] = torch.zeros(1, dtype=torch.uint8).expand(2_000_000_000)

    ckpt = crafted(trained, tmp_path / "rng.pt", zero_stride)
    assert ckpt.stat().st_size < 1 << 20
    refused([*RESUME, f"dataset.root={tiny_root}", f"trainer.resume={ckpt}",
             f"hydra.run.dir={tmp_path / 'run'}"], "its tensor rng.torch of shape (2000000000,) is a view")


def test_an_rng_state_of_another_shape_is_refused_on_resume(trained, tmp_path, tiny_root):
    keys = torch.zeros(7, dtype=torch.int64)  # MT19937 has 624
    ckpt = crafted(trained, tmp_path / "rng.pt", lambda s: s["rng"]["numpy"].update(keys=keys))
    refused([*RESUME, f"dataset.root={tiny_root}", f"trainer.resume={ckpt}",
             f"hydra.run.dir={tmp_path / 'run'}"], "its stored random-number states (rng) are not")


# --- items 11 and 12: one line, not a traceback -------------------------------------------------------------------

def test_a_stored_config_nested_5000_deep_is_one_line(trained, tmp_path, image):
    def deep(state):
        state["config"] = state["config"] + "deep: " + "[" * 5000 + "]" * 5000 + "\n"

    ckpt = crafted(trained, tmp_path / "deep.pt", deep)
    for consumer in ("eval", "predict"):
        refused(consumers(ckpt, tmp_path, image)[consumer], "nests deeper than 32 levels")


@pytest.mark.parametrize("key, value, says", [
    ("precision", "fp64", "its stored trainer.precision='fp64': use one of"),
    ("label_smoothing", 5, "its stored loss=CrossEntropy: label_smoothing"),
])
def test_a_stored_value_that_fails_only_when_used_is_one_line_in_eval(trained, tmp_path, tiny_root, key, value, says):
    group = "trainer" if key == "precision" else "loss"
    ckpt = crafted(trained, tmp_path / "c.pt", config=lambda c: c[group].update({key: value}))
    refused([str(REPO / "eval.py"), f"ckpt={ckpt}", f"data_root={tiny_root}", f"hydra.run.dir={tmp_path / 'eval'}"],
            says)
    assert not (tmp_path / "eval").exists()


def test_a_version_1_checkpoint_whose_group_is_not_a_mapping_is_one_line(trained, tmp_path, image):
    def version_1(state):
        state["version"] = 1
        del state["choices"], state["data"]

    ckpt = crafted(trained, tmp_path / "v1.pt", version_1, config=lambda c: c.update(optimizer="adam"))
    refused(consumers(ckpt, tmp_path, image)["predict"], "its stored optimizer is a str, not a config group")


def test_negative_cnn_channels_are_one_line(tiny_root, tmp_path):
    refused([str(REPO / "train.py"), *TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / 'run'}",
             "model=cnn", "model.channels=[-1,64]"], "model.channels=[-1, 64]: must be positive integers")


# --- item 13: eval.py keeps nothing when it fails on an error that is not the project's ---------------------------

FAULTY_EVAL = """
import runpy, sys
import trainer.loop.metrics
def failing(*args, **kwargs):
    raise RuntimeError("a fault inside torch")
trainer.loop.metrics.evaluate = failing  # eval.py imports it by name: patched before it runs
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_eval_failing_on_a_fault_of_another_kind_leaves_no_directory(trained, tmp_path, tiny_root):
    done = run_bounded(["-c", FAULTY_EVAL, str(REPO / "eval.py"), f"ckpt={trained}", f"data_root={tiny_root}",
                        f"output_root={tmp_path / 'outputs'}"], timeout=60)
    assert done.returncode == 1 and "RuntimeError: a fault inside torch" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*")), \
        list((tmp_path / "outputs").rglob("*"))


# --- item 14: control characters from data are escaped before they reach a terminal or a log ----------------------

FORGED = "MNIST\nerror: forged line \x1b[2J\x1b[31m"


def test_a_stored_dataset_name_cannot_forge_a_line(trained, tmp_path, tiny_root):
    def renamed(state):
        state["data"].update(name=FORGED, digest="0" * 64)

    ckpt = crafted(trained, tmp_path / "named.pt", renamed)
    line = refused([*RESUME, f"dataset.root={tiny_root}", f"trainer.resume={ckpt}",
                    f"hydra.run.dir={tmp_path / 'run'}"], "it was trained on other data")
    assert "MNIST\\nerror: forged line \\x1b[2J" in line and "\x1b" not in line


def test_class_names_are_escaped_in_evals_confusion_matrix(trained, tmp_path):
    classes = [f"digit {k}" for k in range(10)]
    classes[3] = "three\nerror: forged line \x1b[2J"
    x = np.random.default_rng(0).integers(0, 255, (60, 28, 28), dtype=np.uint8)
    y = np.arange(60) % 10
    np.savez(tmp_path / "named.npz", train_x=x, train_y=y, test_x=x[:20], test_y=y[:20], classes=np.array(classes))
    done = run_bounded([str(REPO / "eval.py"), f"ckpt={trained}", "dataset=tensors",
                        f"dataset.path={tmp_path / 'named.npz'}", "dataset.val_size=10",
                        f"hydra.run.dir={tmp_path / 'eval'}"], timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr  # eval.py logs to the console only
    assert "three\\nerror" in output and "\x1b" not in output  # the table shows 12 characters of a name
    assert not any(line.startswith("error: forged") for line in output.splitlines())


# --- item 17: predict.py reads regular files only -----------------------------------------------------------------

def test_predict_refuses_a_fifo_instead_of_waiting_on_it(trained, tmp_path):
    os.mkfifo(tmp_path / "image.png")
    refused([str(REPO / "scripts" / "predict.py"), str(trained), str(tmp_path / "image.png")],
            "image.png: not a regular file")
