"""`python eval.py ckpt=...`: the model is rebuilt from the checkpoint's own config."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY, run_train
from image_data import with_one_pixel_changed

from trainer.cli.config import model_from_checkpoint


@pytest.fixture(scope="module")
def trained(faint_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_train(*TINY, f"dataset.root={faint_root}", f"hydra.run.dir={run_dir}", "model=cnn",
                       "model.channels=[8,16]", "trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr
    return run_dir


def run_eval(*overrides):
    return run_train(*overrides, script="eval.py")


def test_eval_rebuilds_the_model_from_the_checkpoint_and_matches_training(trained, faint_root, tmp_path):
    # data_root: the checkpoint names where it was trained on, but never chooses where files are read or written
    result = run_eval(f"ckpt={trained}/checkpoints/best.pt", f"data_root={faint_root}",
                      f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    theirs = json.loads((trained / "metrics.json").read_text())  # train.py's own test of best.pt
    for k in ("test/loss", "test/acc", "test/f1"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k
    assert ours["dataset"] == "MNIST" and ours["split"] == "test" and ours["images"] == 200
    rows = list(csv.reader(open(tmp_path / "eval" / "confusion_matrix.csv")))
    assert rows[0][1:] == [str(d) for d in range(10)]
    counts = [[int(n) for n in row[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == 200 and sum(counts[i][i] for i in range(10)) == round(ours["test/acc"] * 200)
    assert "confusion matrix" in result.stdout and "acc " in result.stdout
    # Accuracy and macro F1 recomputed from the raw test files and the model's own predictions, without the
    # project's data pipeline or metrics: the IDX bytes, the stored normalisation, an argmax and a few counts.
    raw = faint_root / "MNIST" / "raw"
    images = torch.from_numpy(np.fromfile(raw / "t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.fromfile(raw / "t10k-labels-idx1-ubyte", np.uint8, offset=8)).long()
    restored = model_from_checkpoint(trained / "checkpoints" / "best.pt")
    mean, std = (torch.tensor(restored.data[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        predicted = restored.model.eval()((images / 255 - mean) / std).argmax(dim=1)  # (200,)
    tp = torch.stack([((predicted == c) & (labels == c)).sum() for c in range(10)]).double()
    fp = torch.stack([((predicted == c) & (labels != c)).sum() for c in range(10)]).double()
    fn = torch.stack([((predicted != c) & (labels == c)).sum() for c in range(10)]).double()
    macro_f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean()
    assert 0.2 < ours["test/acc"] < 1  # a model that gets some right and some wrong: F1 differs from accuracy
    assert ours["test/acc"] == pytest.approx(float((predicted == labels).double().mean()), abs=1e-6)
    assert ours["test/f1"] == pytest.approx(float(macro_f1), abs=1e-6)


def test_eval_on_another_dataset_and_on_the_validation_split(trained, faint_root, tmp_path):
    result = run_eval(f"ckpt={trained}/checkpoints/last.pt", "dataset=fashion_mnist", f"dataset.root={faint_root}",
                      "dataset.verify=false", "dataset.val_size=100", f"hydra.run.dir={tmp_path}/fashion")
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "fashion" / "metrics.json").read_text())
    assert out["dataset"] == "FashionMNIST" and "Ankle boot" in out["per_class_acc"]
    result = run_eval(f"ckpt={trained}/checkpoints/best.pt", "split=val", f"data_root={faint_root}",
                      f"hydra.run.dir={tmp_path}/val")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["images"] == 100


def test_eval_warns_when_the_data_is_not_the_data_it_was_trained_on(trained, faint_root, tmp_path):
    """One test image changed since training: eval says the split may not be what the model was tested on."""
    changed = with_one_pixel_changed(faint_root, tmp_path / "changed", "t10k")
    warned = run_eval(f"ckpt={trained}/checkpoints/best.pt", f"data_root={changed}", f"hydra.run.dir={tmp_path}/a")
    assert warned.returncode == 0, warned.stderr
    assert "is not the data the model was trained on" in warned.stdout + warned.stderr
    same = run_eval(f"ckpt={trained}/checkpoints/best.pt", f"data_root={faint_root}", f"hydra.run.dir={tmp_path}/b")
    assert same.returncode == 0 and "is not the data" not in same.stdout + same.stderr


@pytest.mark.parametrize("overrides, says", [
    ([], "ckpt is required"),
    (["{trained}/checkpoints/best.pt"], "give the checkpoint as ckpt={trained}/checkpoints/best.pt"),  # as predict
    (["ckpt=/nonexistent.pt"], "does not exist"),
    (["ckpt={trained}/checkpoints/best.pt", "split=train"], "split=train: must be one of val, test"),
    (["ckpt={trained}/train.log"], "not a readable checkpoint"),
    (["ckpt={trained}"], "is a directory, not a checkpoint file; it holds {trained}/checkpoints/best.pt"),
    (["ckpt={trained}/checkpoints/best.pt", "trust_checkpoint=no"], "trust_checkpoint=no: must be true or false"),
    (["ckpt={trained}/checkpoints/best.pt", "dataset.download=false"],
     "dataset has no keys until an option of the dataset group is chosen (dataset=<option> dataset.download=...)"),
])
def test_eval_bad_input(trained, tmp_path, overrides, says):
    result = run_eval(*[o.format(trained=trained) for o in overrides], f"hydra.run.dir={tmp_path}/e")
    says = says.format(trained=trained)
    assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()  # a refused evaluation leaves no directory behind


def test_with_ema_eval_and_exports_read_the_average_that_the_run_tested(faint_root, tmp_path):
    """trainer.ema_decay: best.pt's "model" is the weights' average (batch-norm statistics included), which
    train.py's own test, eval.py and model_from_checkpoint (predict.py, export.py) all use."""
    run_dir = tmp_path / "run"
    result = run_train(*TINY, f"dataset.root={faint_root}", f"hydra.run.dir={run_dir}", "model=cnn",
                       "model.channels=[8,16]", "trainer.max_epochs=2", "trainer.ema_decay=0.9",
                       "trainer.ema_warmup=true")
    assert result.returncode == 0, result.stderr
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert any(not torch.equal(best["model"][k], v) for k, v in best["train_model"].items() if v.is_floating_point())
    restored = model_from_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert all(torch.equal(restored.model.state_dict()[k], v) for k, v in best["model"].items())
    result = run_eval(f"ckpt={run_dir}/checkpoints/best.pt", f"data_root={faint_root}",
                      f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr
    ours, theirs = (json.loads(p.read_text()) for p in (tmp_path / "eval" / "metrics.json", run_dir / "metrics.json"))
    for k in ("test/loss", "test/acc", "test/f1"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k


def test_eval_of_a_bf16_run_evaluates_at_its_precision_and_matches_its_test(faint_root, tmp_path):
    # bf16 predictions differ from fp32's for a few images: eval.py must use the run's precision (and layout)
    run_dir = tmp_path / "run"
    result = run_train(*TINY, f"dataset.root={faint_root}", f"hydra.run.dir={run_dir}", "model=cnn",
                       "model.channels=[8,16]", "trainer.max_epochs=1", "trainer.precision=bf16")
    assert result.returncode == 0, result.stderr
    result = run_eval(f"ckpt={run_dir}/checkpoints/best.pt", f"data_root={faint_root}",
                      f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr
    ours, theirs = (json.loads(p.read_text()) for p in (tmp_path / "eval" / "metrics.json", run_dir / "metrics.json"))
    for k in ("test/loss", "test/acc", "test/f1"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k
