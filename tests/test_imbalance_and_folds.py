"""Class imbalance and k-fold cross-validation: loss.class_weights, dataset.sampler=balanced, dataset.folds and
dataset.fold, from the pieces (weights, draws, folds) to the commands (train, eval, summarize)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_train, train_in_process
from data_args import common
from image_data import arrays

from trainer.data import BatchLoader, BatchTransform, TensorsFile
from trainer.data.splits import Folds, split_indices
from trainer.errors import UserError
from trainer.loop.losses import BCEOneVsRest, CrossEntropy, MultiMargin, NLLOnLogSoftmax, class_weights_for

COUNTS = (400, 100, 20)  # a long tail of three classes


@pytest.fixture(scope="module")
def tail(tmp_path_factory):
    """A tensors file of 12x12 grey patterns: 400, 100 and 20 images of classes 0, 1, 2; a balanced test split."""
    x, y = arrays(1500, 3, 12, 12, 1)
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in enumerate(COUNTS)])
    path = tmp_path_factory.mktemp("tail") / "tail.npz"
    np.savez(path, train_x=x[keep][..., 0], train_y=y[keep], test_x=x[-150:][..., 0], test_y=y[-150:])
    return path


def dataset(path, **overrides):
    return TensorsFile(**common(path=str(path), cache=False, **overrides))


# ------------------------------------------------------------------------------------------------- class weights

def test_auto_weights_are_the_inverse_frequency_of_the_training_split():
    weights = class_weights_for("auto", [400, 100, 20], ("a", "b", "c"))
    assert weights == pytest.approx([520 / (3 * 400), 520 / (3 * 100), 520 / (3 * 20)])
    assert class_weights_for([1, 2, 0.5], [400, 100, 20], ("a", "b", "c")) == [1.0, 2.0, 0.5]
    assert class_weights_for(None, [400, 100, 20], ("a", "b", "c")) is None


@pytest.mark.parametrize("value, counts, words", [
    ([1, 2], [5, 5, 5], "loss.class_weights=[1.0, 2.0]: 2 weights, but the data has 3 classes (a, b, c)"),
    ("heavy", [5, 5, 5], "loss.class_weights='heavy': must be null, auto, or a list of 3 numbers >= 0"),
    ([1, -1, 1], [5, 5, 5], "must be null, auto, or a list of 3 numbers >= 0"),
    ([0, 0, 0], [5, 5, 5], "at least one weight must be > 0"),
    ("auto", [5, 0, 5], "class 'b' has no training image"),
    ("auto", None, "have no classes to count"),
])
def test_bad_class_weights_are_one_line(value, counts, words):
    with pytest.raises(UserError, match=None) as e:
        class_weights_for(value, counts, ("a", "b", "c"))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_each_weighted_loss_is_torchs_with_its_weight():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 3), torch.randint(0, 3, (16,))
    w = [0.5, 2.0, 7.0]
    tw = torch.tensor(w)
    assert CrossEntropy(class_weights=w)(logits, targets) == pytest.approx(float(F.cross_entropy(logits, targets,
                                                                                                 weight=tw)))
    assert CrossEntropy(label_smoothing=0.1, class_weights=w)(logits, targets) == pytest.approx(
        float(F.cross_entropy(logits, targets, weight=tw, label_smoothing=0.1)))
    assert NLLOnLogSoftmax(class_weights=w)(logits, targets) == pytest.approx(float(F.cross_entropy(logits, targets,
                                                                                                   weight=tw)))
    assert MultiMargin(class_weights=w)(logits, targets) == pytest.approx(float(F.multi_margin_loss(logits, targets,
                                                                                                   weight=tw)))
    one_hot = F.one_hot(targets, 3).float()
    assert BCEOneVsRest(class_weights=w)(logits, targets) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, one_hot, weight=tw)))
    # the weights change the loss (the unweighted value differs), and None is torch's plain loss
    assert CrossEntropy(class_weights=w)(logits, targets) != pytest.approx(float(CrossEntropy()(logits, targets)))
    assert CrossEntropy()(logits, targets) == pytest.approx(float(F.cross_entropy(logits, targets)))


def test_the_weights_move_with_the_loss_and_are_a_plain_list():
    loss = CrossEntropy(class_weights=[1, 2, 3])
    assert loss.class_weights == [1.0, 2.0, 3.0] and dict(loss.named_buffers())["weight"].tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------------- the sampler

def loader(labels, weights, seed=0, batch_size=8):
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    return BatchLoader(images, labels, batch_size, transform=BatchTransform(0.0, 1.0), shuffle=True, seed=seed,
                       weights=weights)


def test_balanced_draws_give_every_class_the_same_share():
    labels = torch.tensor([0] * 400 + [1] * 100 + [2] * 20)
    counts = torch.bincount(labels).double()
    balanced = loader(labels, 1.0 / counts[labels])
    drawn = torch.cat([labels[balanced.epoch_order()] for balanced.epoch in range(10)])  # 5200 draws
    share = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03), share
    plain = loader(labels, None)
    assert torch.bincount(labels[plain.epoch_order()]).tolist() == [400, 100, 20]  # a permutation: each once


def test_balanced_draws_are_a_function_of_seed_and_epoch_only():
    labels = torch.tensor([0] * 40 + [1] * 10)
    weights = 1.0 / torch.bincount(labels).double()[labels]
    a, b = loader(labels, weights, seed=3), loader(labels, weights, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert torch.equal(a.epoch_order(), b.epoch_order())
    b.set_epoch(3)
    assert not torch.equal(a.epoch_order(), b.epoch_order())
    assert not torch.equal(a.epoch_order(), loader(labels, weights, seed=4).epoch_order())


def test_ranks_take_disjoint_slices_of_the_same_balanced_draws():
    labels = torch.arange(48) % 3
    labels[:30] = 0  # 34 of class 0, 7 of 1, 7 of 2
    weights = 1.0 / torch.bincount(labels).double()[labels]
    images = torch.arange(48, dtype=torch.uint8).view(48, 1, 1, 1)  # each image: its own position
    one = BatchLoader(images, labels, 16, transform=lambda x: x, shuffle=True, seed=1, weights=weights)
    ranks = [BatchLoader(images, labels, 8, transform=lambda x: x, shuffle=True, seed=1, weights=weights)
             for _ in range(2)]
    for r, rank in enumerate(ranks):
        rank.shard(r, 2)
    for epoch in (0, 1):
        for b in (one, *ranks):
            b.set_epoch(epoch)
        together = [torch.cat([x0, x1]) for (x0, _), (x1, _) in zip(*ranks)]
        assert [x.flatten().tolist() for x in together] == [x.flatten().tolist() for x, _ in one]
    # a resumed epoch (iter_from) continues the same draws
    one.set_epoch(1)
    assert [x.flatten().tolist() for x, _ in one.iter_from(1)] == [x.flatten().tolist() for x, _ in one][1:]


@pytest.mark.parametrize("overrides, words", [
    ({"sampler": "weighted"}, "dataset.sampler='weighted': must be one of shuffle, balanced"),
    ({"sampler": "balanced", "shuffle": False}, "it needs dataset.shuffle=true"),
    ({"sampler": "balanced", "targets": "values"}, "the task's targets are values, not class indices"),
    ({"folds": 1}, "dataset.folds=1: must be an integer >= 2"),
    ({"folds": 5, "fold": 5}, "dataset.fold=5: must be an integer in 0..4 for dataset.folds=5"),
    ({"folds": 5, "fold": -1}, "dataset.fold=-1: must be an integer in 0..4"),
    ({"fold": 2}, "dataset.fold=2: needs dataset.folds"),
])
def test_bad_sampler_and_fold_values_are_one_line(tail, overrides, words):
    with pytest.raises(UserError) as e:
        dataset(tail, **overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- k-fold

def test_folds_partition_the_pool_stratified_and_leave_the_test_split_alone():
    labels = torch.tensor([0] * 400 + [1] * 100 + [2] * 23)
    kwargs = dict(hold_test=True, hold_val=True, val_size=0.1, test_size=0.1, split_seed=7)
    _, _, test = split_indices(labels, folds=None, **kwargs)
    vals = []
    for i in range(5):
        train, val, test_i = split_indices(labels, folds=Folds.of(5, i), **kwargs)
        assert torch.equal(test_i, test)  # the test split is the one without folds, for every fold
        assert set(train.tolist()).isdisjoint(val.tolist()) and set(train.tolist()).isdisjoint(test.tolist())
        assert len(train) + len(val) + len(test) == len(labels)
        vals.append(val)
    every = torch.cat(vals)
    assert len(every) == len(set(every.tolist())) == len(labels) - len(test)  # each image validates exactly once
    per_fold = torch.stack([torch.bincount(labels[v], minlength=3) for v in vals])  # (5 folds, 3 classes)
    assert (per_fold.max(dim=0).values - per_fold.min(dim=0).values).max() <= 1, per_fold  # stratified
    again = split_indices(labels, folds=Folds.of(5, 2), **kwargs)
    assert torch.equal(again[1], vals[2])  # seeded by split_seed alone
    other = split_indices(labels, folds=Folds.of(5, 2), **{**kwargs, "split_seed": 8})
    assert not torch.equal(other[1], vals[2])


def test_a_dataset_with_folds_validates_on_its_fold(tail):
    data = dataset(tail, folds=4, fold=1, val_size=0.1, test_size=0.1)
    assert data.val.num_items == 130 and data.train.num_items == 390  # 520 / 4; the test split is the file's
    assert data.identity()["fold"] == [1, 4, 0]
    assert data.class_counts == [300, 75, 15]
    assert "fold" not in dataset(tail).identity()


def test_folds_refuse_a_source_with_its_own_validation_split(tmp_path):
    x, y = arrays(60, 3, 8, 8, 1)
    from trainer.data import ImageDataset, Images

    class WithVal(ImageDataset):
        def read(self):
            return Images(x[:40, ..., 0], y[:40], ["a", "b", "c"], val_x=x[40:, ..., 0], val_y=y[40:])

    with pytest.raises(UserError, match="has a validation split of its own"):
        WithVal(**common(cache=False, folds=3))


# ------------------------------------------------------------------------------------------------- the commands

def test_train_shows_and_records_weights_and_fold_and_eval_refuses_another_fold(tail, tmp_path):
    out = tmp_path / "out"
    args = ("dataset=tensors", f"dataset.path={tail}", "model=mlp", "model.hidden_sizes=[32]", "trainer.max_epochs=1",
            "trainer.device=cpu", "loss.class_weights=auto", "dataset.sampler=balanced", "dataset.folds=4",
            "dataset.fold=1", f"output_root={out}")
    result = run_train(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "class weights (loss.class_weights=auto, inverse frequency in the training split): 0 0.433, 1 1.73, " \
           "2 8.67" in said
    assert "k-fold: fold 1 of dataset.folds=4 validates (stratified by class" in said
    assert "dataset.sampler=balanced: each epoch draws 390 training images" in said
    (ckpt,) = out.rglob("best.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["class_weights"] == pytest.approx([390 / (3 * 300), 390 / (3 * 75), 390 / (3 * 15)])
    assert state["data"]["fold"] == [1, 4, 0]
    evaluate = [sys.executable, "eval.py", f"ckpt={ckpt}", f"data_root={tail}", f"output_root={tmp_path / 'evals'}"]
    same = subprocess.run([*evaluate, "split=val"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    other = subprocess.run([*evaluate, "split=val", "dataset=tensors", f"dataset.path={tail}", "dataset.folds=4",
                            "dataset.fold=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [
        f"error: split=val: the model in {ckpt} was trained with fold 1 of dataset.folds=4 (split_seed 0), and this "
        "validation split is fold 2 of dataset.folds=4 (split_seed 0)'s, which holds images it trained on; "
        "evaluate with dataset.folds=4 dataset.fold=1, or split=test"]
    test = subprocess.run([*evaluate, "split=test", "dataset=tensors", f"dataset.path={tail}", "dataset.folds=4",
                           "dataset.fold=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stderr[-2000:]  # the test split is every fold's


def test_a_k_fold_sweep_is_summarized_as_mean_and_spread(tail, tmp_path):
    out = tmp_path / "out"
    # with the joblib launcher (the README's k-fold sweep runs the basic one)
    sweep = run_train("-m", "hydra/launcher=joblib", "dataset=tensors", f"dataset.path={tail}", "model=mlp",
                      "model.hidden_sizes=[32]", "trainer.max_epochs=1", "trainer.device=cpu", "dataset.folds=3",
                      "dataset.fold=range(3)", f"output_root={out}")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    table = subprocess.run([sys.executable, "scripts/summarize.py", str(out), "--format", "csv"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, *rows = list(csv.reader(table.stdout.splitlines()))
    assert len(rows) == 1, table.stdout  # the three folds, one row
    row = dict(zip(header, rows[0]))
    assert row["status"] == "3 folds" and row["run"].endswith("(folds 0,1,2)")
    assert "dataset.fold=" not in row["overrides"] and "dataset.folds=3" in row["overrides"]
    assert "Joblib.Parallel" in sweep.stdout + sweep.stderr  # the folds ran as joblib's parallel jobs
    accs = [json.loads(p.read_text())["test/acc"] for p in sorted(out.rglob("metrics.json"))]
    mean, spread = (float(v) for v in row["test/acc"].split(" ± "))
    assert mean == pytest.approx(np.mean(accs), abs=1e-4) and spread == pytest.approx(np.std(accs, ddof=1), abs=1e-4)


def test_bad_values_through_train_are_one_line(tail):
    base = ("dataset=tensors", f"dataset.path={tail}", "model=mlp", "trainer.max_epochs=1")
    for extra, line in ((("loss.class_weights=[1,2]",), "error: loss.class_weights=[1.0, 2.0]: 2 weights, but the "
                         "data has 3 classes (0, 1, 2), one weight each"),
                        (("dataset.folds=1",), "error: dataset.folds=1: must be an integer >= 2"),
                        (("dataset.folds=3", "dataset.fold=3"), "error: dataset.fold=3: must be an integer in 0..2 "
                         "for dataset.folds=3")):
        result = train_in_process(*base, *extra)
        assert result.returncode == 1 and result.stderr.strip() == line, result.stderr


def test_the_long_tailed_set_keeps_a_geometric_share_of_each_class_and_the_whole_test_split():
    from trainer.data.generated import long_tailed

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (3000, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 300)
    tx, ty = rng.integers(0, 255, (500, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 50)
    made = long_tailed(x, y, tx, ty, [str(c) for c in range(10)], imbalance=100)
    counts = np.bincount(made["train_y"], minlength=10)
    assert counts.tolist() == [int(300 * 100 ** (-c / 9)) for c in range(10)]  # 300 down to 3
    assert np.array_equal(made["test_y"], ty) and np.array_equal(made["test_x"], tx)
    kept = {x[i].tobytes() for i in range(3000)}
    assert all(image.tobytes() in kept for image in made["train_x"])  # images of the source, with their labels
    again = long_tailed(x, y, tx, ty, [str(c) for c in range(10)], imbalance=100)
    assert np.array_equal(again["train_x"], made["train_x"])  # seeded
    other = long_tailed(x, y, tx, ty, [str(c) for c in range(10)], seed=1)  # class 0 whole, the others sampled
    assert not np.array_equal(other["train_x"], made["train_x"])
