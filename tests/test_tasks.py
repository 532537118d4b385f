"""Tasks beyond single-label classification (trainer.tasks): the metrics against torchmetrics, the metric-learning
losses against brute force, and each task end to end through the commands as the docs print them (train, eval,
predict, export), with a SIGKILL mid-epoch resumed bitwise, and the refusals of what does not fit."""

import json
import math
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, REPO, TINY, run_train, run_train_stopping, train_in_process
from PIL import Image

from trainer.loop.losses import ContrastiveLoss, MinedTripletLoss, PairwiseHingeEmbeddingLoss
from trainer.tasks import Classification, Embedding, MultiLabel, Regression
from trainer.tasks.embedding import EmbeddingMetrics

CPU = torch.device("cpu")


# ---- metrics ----------------------------------------------------------------------------------------------------

def multilabel_batch(n=3000, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, k, generator=g) < torch.linspace(0.1, 0.6, k)).float()  # (n, k), labels of all rates
    logits = 2.5 * (targets * 2 - 1) * torch.rand(n, k, generator=g) + torch.randn(n, k, generator=g)
    return logits, targets


class Names:  # what a task's metrics read of the dataset
    def __init__(self, classes):
        self.classes, self.num_classes = classes, len(classes)


def test_multilabel_metrics_match_torchmetrics():
    from torchmetrics.classification import (
        MultilabelAUROC,
        MultilabelAveragePrecision,
        MultilabelExactMatch,
        MultilabelF1Score,
    )

    logits, targets = multilabel_batch()
    metrics = MultiLabel(threshold=0.4).metrics("test", data=Names(list("abcde")), device=CPU, top_k=None, full=True)
    for chunk in range(0, len(logits), 700):  # batches of an uneven split, flushed twice
        metrics.add(torch.tensor(0.5), logits[chunk:chunk + 700], targets[chunk:chunk + 700])
        if chunk == 1400:
            metrics.flush()
    found = metrics.compute("test")
    probs, truth = logits.sigmoid(), targets.long()
    for average in ("micro", "macro"):
        expected = MultilabelF1Score(5, threshold=0.4, average=average)(probs, truth)
        assert found[f"test/f1_{average}"] == pytest.approx(float(expected), abs=1e-6)
    assert found["test/subset_acc"] == pytest.approx(float(MultilabelExactMatch(5, threshold=0.4)(probs, truth)))
    ap = MultilabelAveragePrecision(5, average=None, thresholds=None)(probs, truth)
    auroc = MultilabelAUROC(5, average=None, thresholds=None)(probs, truth)
    for i, name in enumerate("abcde"):  # read off histograms 1/128 of a logit wide: exact up to ties in a bin
        assert found[f"test/ap/{name}"] == pytest.approx(float(ap[i]), abs=2e-3)
        assert found[f"test/auroc/{name}"] == pytest.approx(float(auroc[i]), abs=1e-3)
    assert found["test/map"] == pytest.approx(float(ap.mean()), abs=2e-3)
    assert found["test/loss"] == pytest.approx(0.5)


@pytest.mark.parametrize("columns", [["angle"], ["x", "y"]])
def test_regression_metrics_in_the_targets_units_match_torchmetrics(columns):
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

    g = torch.Generator().manual_seed(1)
    d = len(columns)
    targets = 40 * torch.randn(900, d, generator=g) + 7  # (n, d) in degrees, say
    task = Regression()
    task.fit(targets[:600], torch.nn.MSELoss())  # the scale of the "training split"
    assert task.mean == pytest.approx(targets[:600].double().mean(0).tolist())
    outputs = (targets - torch.tensor(task.mean)) / torch.tensor(task.std) + 0.2 * torch.randn(900, d, generator=g)
    metrics = task.metrics("val", data=Names(columns), device=CPU, top_k=None, full=False)
    metrics.add(torch.tensor(1.0), outputs[:400], targets[:400])
    metrics.add(torch.tensor(1.0), outputs[400:], targets[400:])
    found = metrics.compute("val")
    predicted = outputs * torch.tensor(task.std) + torch.tensor(task.mean)
    rmse = MeanSquaredError(squared=False, num_outputs=d)(predicted, targets).mean()
    assert found["val/mae"] == pytest.approx(float(MeanAbsoluteError()(predicted, targets)), rel=1e-5)
    assert found["val/rmse"] == pytest.approx(float(rmse), rel=1e-5)
    r2 = R2Score(multioutput="uniform_average") if d > 1 else R2Score()
    assert found["val/r2"] == pytest.approx(float(r2(predicted.squeeze(1) if d == 1 else predicted,
                                                     targets.squeeze(1) if d == 1 else targets)), abs=1e-5)
    assert found["val/rmse"] > 5  # in degrees, not in standardised units
    true, pred = metrics.last_points  # the scatter picture's points, in the targets' units
    assert torch.allclose(pred, predicted[:len(pred)], atol=1e-3) and torch.equal(true, targets[:len(true)])


def test_a_torchmetrics_metric_gets_the_tasks_predictions_in_its_units():
    """metrics=[...] on the other tasks: a regression's metric compares values in the targets' units, a multi-label
    metric gets the logits and 0/1 integer targets."""
    from torchmetrics.classification import MultilabelF1Score
    from torchmetrics.regression import MeanAbsoluteError

    g = torch.Generator().manual_seed(4)
    targets = 50 * torch.rand(300, 1, generator=g)
    task = Regression()
    task.fit(targets, torch.nn.L1Loss())
    outputs = torch.randn(300, 1, generator=g)
    metrics = task.metrics("val", data=Names(["value"]), device=CPU, top_k=None, full=False,
                           extra={"tm_mae": MeanAbsoluteError()})
    metrics.add(torch.tensor(1.0), outputs, targets)
    found = metrics.compute("val")
    assert found["val/tm_mae"] == pytest.approx(found["val/mae"], rel=1e-5) and found["val/mae"] > 5
    logits, multi_hot = multilabel_batch(400, 5)
    metrics = MultiLabel().metrics("val", data=Names(list("abcde")), device=CPU, top_k=None, full=False,
                                   extra={"tm_f1": MultilabelF1Score(5, average="micro")})
    metrics.add(torch.tensor(1.0), logits, multi_hot)
    found = metrics.compute("val")
    assert found["val/tm_f1"] == pytest.approx(found["val/f1_micro"], abs=1e-6)


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_a_checkpoint_mid_interval_resumes_the_epoch_metrics_bit_for_bit(task):
    """SumMetrics keeps the batches not yet reduced in its state, so the sums a resumed run ends the epoch with are
    the ones of a run that never stopped, float rounding included."""
    logits, multi_hot = multilabel_batch(700, 3, seed=2)
    targets = multi_hot if task == "multilabel" else logits.detach() * 3 + 1
    made = Regression() if task == "regression" else MultiLabel()
    if task == "regression":
        made.fit(targets, torch.nn.MSELoss())

    def fresh():
        return made.metrics("train", data=Names(["a", "b", "c"]), device=CPU, top_k=None, full=False)

    straight, first = fresh(), fresh()
    for i, chunk in enumerate(range(0, 700, 50)):
        batch = (torch.tensor(0.1 * i), logits[chunk:chunk + 50], targets[chunk:chunk + 50])
        straight.add(*batch)
        if i == 4:
            straight.flush()
        if i < 7:
            first.add(*batch)
            if i == 4:
                first.flush()
    resumed = fresh()
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))
    for i, chunk in enumerate(range(350, 700, 50), start=7):
        resumed.add(torch.tensor(0.1 * i), logits[chunk:chunk + 50], targets[chunk:chunk + 50])
    assert resumed.compute("train") == straight.compute("train")


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_nearest_neighbour_accuracy_and_recall_at_k_against_brute_force():
    g = torch.Generator().manual_seed(3)
    ref_x, ref_y = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    ref_x += 1.5 * F.one_hot(ref_y, 8).float()  # classes roughly apart
    query_x, query_y = torch.randn(120, 8, generator=g), torch.randint(0, 4, (120,), generator=g)
    query_x += 1.5 * F.one_hot(query_y, 8).float()
    reference = [(ref_x[i:i + 64], ref_y[i:i + 64]) for i in range(0, 300, 64)]
    task = Embedding(embedding_dim=8)
    metrics = EmbeddingMetrics(CPU, reference=reference, num_classes=4, top_k=3, on_reference=task._set_centroids)
    metrics.begin(lambda x, y: (x, torch.tensor(0.0)))
    metrics.add(torch.tensor(0.0), query_x, query_y)
    found = metrics.compute("val")
    distances = torch.cdist(F.normalize(query_x, dim=1), F.normalize(ref_x, dim=1))  # (120, 300)
    nearest = distances.topk(3, largest=False).indices
    assert found["val/knn_acc"] == pytest.approx(float((ref_y[nearest[:, 0]] == query_y).float().mean()))
    assert found["val/recall_at_3"] == pytest.approx(float((ref_y[nearest] == query_y[:, None]).any(1).float().mean()))
    assert 0.5 < found["val/knn_acc"] < 1
    means = torch.stack([F.normalize(ref_x[ref_y == c], dim=1).mean(0) for c in range(4)])
    assert torch.allclose(task.centroids, F.normalize(means, dim=1), atol=1e-5)
    (row,) = task.predictions(query_x[:1], ["a", "b", "c", "d"], top=2)  # predict.py: the nearest class centroids
    assert row[0][2] <= row[1][2] and row[0][0] == int(torch.cdist(F.normalize(query_x[:1], dim=1),
                                                                   task.centroids).argmin())


# ---- losses -----------------------------------------------------------------------------------------------------

def embeddings_and_classes(seed=0, n=24, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, requires_grad=True), torch.randint(0, 4, (n,), generator=g)


def test_batch_hard_and_semi_hard_triplets_are_the_ones_brute_force_picks():
    e, y = embeddings_and_classes()
    x = F.normalize(e.detach(), dim=1)
    d = torch.cdist(x, x)
    for mining in ("batch_hard", "semi_hard"):
        triplets = []
        for a in range(len(y)):
            positives = [p for p in range(len(y)) if p != a and y[p] == y[a]]
            negatives = [n for n in range(len(y)) if y[n] != y[a]]
            if not positives or not negatives:
                continue
            if mining == "batch_hard":
                triplets.append((a, max(positives, key=lambda p: d[a, p]), min(negatives, key=lambda n: d[a, n])))
                continue
            for p in positives:
                farther = [n for n in negatives if d[a, n] > d[a, p]]
                triplets.append((a, p, min(farther, key=lambda n: d[a, n]) if farther else
                                 max(negatives, key=lambda n: d[a, n])))
        a, p, n = map(torch.tensor, zip(*triplets))
        expected = torch.nn.TripletMarginLoss(margin=0.3)(x[a], x[p], x[n])
        found = MinedTripletLoss(margin=0.3, mining=mining)(e, y).detach()
        assert float(found) == pytest.approx(float(expected), abs=1e-5)


def test_pair_losses_weigh_positive_and_negative_pairs_alike_and_have_finite_gradients():
    e, y = embeddings_and_classes(1)
    x = F.normalize(e.detach(), dim=1)
    d = torch.cdist(x, x)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    different = y[:, None] != y[None, :]
    hinge = d[same].mean() + (1.0 - d[different]).clamp(min=0).mean()
    contrastive = (d[same] ** 2).mean() + ((0.8 - d[different]).clamp(min=0) ** 2).mean()
    assert float(PairwiseHingeEmbeddingLoss(margin=1.0)(e, y).detach()) == pytest.approx(float(hinge), abs=1e-5)
    assert float(ContrastiveLoss(margin=0.8)(e, y).detach()) == pytest.approx(float(contrastive), abs=1e-5)
    twins = torch.cat([e[:1], e[:1]]).detach().requires_grad_()  # two identical embeddings: distance 0
    for loss in (MinedTripletLoss(), PairwiseHingeEmbeddingLoss(), ContrastiveLoss()):
        value = loss(torch.cat([twins, e[2:]]), y)
        value.backward()
        assert torch.isfinite(twins.grad).all()
        twins.grad = None
    lonely = MinedTripletLoss()(e[:4], torch.arange(4))  # no positive pair in the batch: no triplet, no NaN
    assert float(lonely.detach()) == 0 and lonely.requires_grad


@pytest.mark.parametrize("task, loss, message", [
    (Regression(), torch.nn.CrossEntropyLoss(), "loss=CrossEntropyLoss is a loss for classification, not "
     "task=regression; use loss=mse, l1, huber or poisson_nll (or a loss of your own)"),
    (Classification(), torch.nn.L1Loss(), "loss=L1Loss is a loss for regression, not task=classification"),
    (MultiLabel(), MinedTripletLoss(), "loss=MinedTripletLoss is a loss for embedding, not task=multilabel"),
    (Embedding(), torch.nn.CrossEntropyLoss(), "loss=CrossEntropyLoss is a loss for classification, not "
     "task=embedding; use loss=triplet, hinge_embedding or contrastive"),
])
def test_a_loss_of_another_task_is_refused_naming_the_ones_that_fit(task, loss, message):
    from trainer.errors import UserError

    class Data:
        num_classes, classes = 3, ["a", "b", "c"]

        class train:  # noqa: N801
            batch_size = 8

    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        task.check_loss(loss, Data, CPU)


# ---- end to end -------------------------------------------------------------------------------------------------

def write_task_files(root):
    """Small learnable tensors files: `values` (a patch's brightness is the target), `counts` (k bright dots, the
    count the target) and `labels` (three patches, each present or not)."""
    g = np.random.default_rng(0)
    n = 600
    noise = g.integers(0, 40, (n, 12, 12))
    value = g.uniform(0, 10, n).astype(np.float32)
    images = noise.copy()
    images[:, 2:8, 2:8] += (value * 20).astype(np.int64)[:, None, None]
    np.savez(root / "values.npz", train_x=images[:480].astype(np.uint8), train_y=value[:480],
             test_x=images[480:].astype(np.uint8), test_y=value[480:], classes=np.array(["brightness"]))
    counts = g.poisson(2.0, n).clip(0, 6)
    dots = noise.copy()
    spots = [(2, 2), (2, 6), (2, 10), (8, 2), (8, 6), (8, 10)]  # (row, column) of the j-th dot
    for i, k in enumerate(counts):
        for r, c in spots[:k]:
            dots[i, r:r + 2, c:c + 2] += 200
    np.savez(root / "counts.npz", train_x=dots[:480].astype(np.uint8), train_y=counts[:480].astype(np.float32),
             test_x=dots[480:].astype(np.uint8), test_y=counts[480:].astype(np.float32))
    present = g.random((n, 3)) < 0.4
    patches = noise.copy()
    for label, (r, c) in enumerate(((1, 1), (1, 7), (7, 4))):
        patches[present[:, label], r:r + 4, c:c + 4] += 200
    np.savez(root / "labels.npz", train_x=patches[:480].astype(np.uint8), train_y=present[:480].astype(np.uint8),
             test_x=patches[480:].astype(np.uint8), test_y=present[480:].astype(np.uint8),
             classes=np.array(["left", "right", "bottom"]))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_files")
    write_task_files(root)
    return root


SMALL = ("dataset.val_size=60", "dataset.batch_size=32", "dataset.eval_batch_size=64", "trainer.device=cpu",
         "trainer.log_every_n_steps=5", "trainer.checkpoint_every_n_steps=3", "trainer.max_epochs=2",
         "trainer.deterministic=true", *MLP, "model.dropout=0.1", "scheduler=onecycle")


def task_args(name, task_files, tiny_root):
    """The overrides of each task's small run, and the metric its metrics.json must hold."""
    return {"regression": (("task=regression", "dataset=tensors", f"dataset.path={task_files}/values.npz",
                            *SMALL), "test/mae"),
            "poisson": (("task=regression", "loss=poisson_nll", "dataset=tensors",
                         f"dataset.path={task_files}/counts.npz", *SMALL), "test/r2"),
            "multilabel": (("task=multilabel", "dataset=tensors", f"dataset.path={task_files}/labels.npz", *SMALL),
                           "test/map"),
            "embedding": (("task=embedding", "loss=triplet", "task.embedding_dim=16", *TINY,
                           f"dataset.root={tiny_root}", *SMALL), "test/knn_acc")}[name]


TASKS = ["regression", "poisson", "multilabel", "embedding"]


@pytest.fixture(scope="module")
def straight_runs(task_files, tiny_root, tmp_path_factory):
    return {}  # filled lazily: each task's uninterrupted run, shared by the tests of that task


def straight(name, task_files, tiny_root, runs, tmp_path_factory):
    if name not in runs:
        run_dir = tmp_path_factory.mktemp(f"straight_{name}") / "run"
        overrides, _ = task_args(name, task_files, tiny_root)
        result = run_train(*overrides, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
    return runs[name]


def check_pictures_and_hparams(name, run_dir):
    """A regression's scatter pictures and HParams entry; an embedding's projector."""
    pictures = {"regression": "val/scatter", "poisson": "test/scatter"}.get(name)
    if pictures:  # predicted against true values, in TensorBoard's Images tab
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.plugins.hparams import plugin_data_pb2

        events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
        events.Reload()
        assert pictures in events.Tags()["images"] and "val/confusion_matrix" not in events.Tags()["images"]
        hparams = events.PluginTagToContent("hparams")  # the HParams tab: the task, and its metrics as columns
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["task"].string_value == "Regression"
        experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
        assert {"test/mae", "test/rmse", "test/r2", "best/val/loss"} <= {m.name.tag for m in experiment.metric_infos}
    if name == "embedding":  # the projector: the validation embeddings with their images
        assert "val/embedding" in (run_dir / "projector_config.pbtxt").read_text()


@pytest.mark.parametrize("name", TASKS)
def test_each_task_trains_evaluates_predicts_and_exports(name, task_files, tiny_root, straight_runs,
                                                         tmp_path_factory, tmp_path):
    run_dir = straight(name, task_files, tiny_root, straight_runs, tmp_path_factory)
    overrides, key = task_args(name, task_files, tiny_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics[key])
    floors = {"regression": ("test/r2", 0.5), "poisson": ("test/r2", 0.3), "multilabel": ("test/map", 0.8),
              "embedding": ("test/knn_acc", 0.8)}
    metric, floor = floors[name]
    assert metrics[metric] > floor, metrics  # learnt, not just run
    check_pictures_and_hparams(name, run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    task = torch.load(ckpt, weights_only=True)["task"]
    assert task["name"] == {"poisson": "regression"}.get(name, name)
    if name == "poisson":  # a regression, whose eval, predict and export the regression case runs
        assert task["link"] == "exp" and task["mean"] is None  # log-rates of the counts themselves, no scale
        return
    path = [o.split("=", 1)[1] for o in overrides if o.startswith(("dataset.path=", "dataset.root="))][0]
    where = "dataset.path" if name != "embedding" else "dataset.root"
    evaluated = subprocess.run([sys.executable, "eval.py", f"ckpt={ckpt}", f"data_root={path}",
                                f"output_root={tmp_path}/out"], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (out,) = (p.parent for p in (tmp_path / "out").rglob("metrics.json"))
    again = json.loads((out / "metrics.json").read_text())
    assert again[key] == pytest.approx(metrics[key], abs=1e-6), (where, again)
    if name in ("regression", "poisson"):
        assert (out / "scatter.png").is_file()
    # predict.py on test images as PNG files: the task's own line per file
    if name == "embedding":
        images = [np.full((28, 28), 0, np.uint8)]
    else:
        images = [np.load(path)["test_x"][i] for i in range(2)]
    files = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    predicted = subprocess.run([sys.executable, "scripts/predict.py", str(ckpt), *files, "--top", "2"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == len(files)
    expected = {"regression": r"0 'brightness' -?\d", "poisson": r"0 'value' \d",
                "embedding": r"\d '[^']+' distance \d\.\d{3}  \d '[^']+' distance",
                "multilabel": r"(\d '(left|right|bottom)' \d+\.\d%|no label reaches)"}
    assert all(re.search(expected[name], line) for line in lines), lines
    exported = subprocess.run([sys.executable, "scripts/export.py", str(ckpt), "--format", "torchscript",
                               "--out", str(tmp_path / "exports"), "--batches", "2", "--data-root", path], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert "accuracy" not in exported.stdout
    assert "max |output diff|" in exported.stdout and "same outputs for" in exported.stdout


@pytest.mark.parametrize("name", ["regression", "multilabel", "embedding"])
def test_each_task_killed_mid_epoch_resumes_bitwise(name, task_files, tiny_root, straight_runs, tmp_path_factory,
                                                   tmp_path):
    run_dir = straight(name, task_files, tiny_root, straight_runs, tmp_path_factory)
    overrides, _ = task_args(name, task_files, tiny_root)
    killed = tmp_path / "killed"
    result = run_train_stopping(*overrides, f"hydra.run.dir={killed}", env={"STOP_AT_STEP": "19",
                                                                          "STOP_SIGNAL": str(int(signal.SIGKILL))})
    assert result.returncode == -signal.SIGKILL
    last = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert last["batch_in_epoch"] > 0  # mid-epoch: its unfinished epoch metrics are in it
    resumed = run_train(*overrides, f"hydra.run.dir={tmp_path}/again", f"trainer.resume={killed}/checkpoints/last.pt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (run_dir, killed))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, killed))
    assert {k: v for k, v in ma.items() if k.startswith(("test/", "best/"))} == \
        {k: v for k, v in mb.items() if k.startswith(("test/", "best/"))}
    assert scalars(run_dir) == scalars(killed)  # the epoch's train metrics too, from the checkpoint's unreduced batches


def scalars(run_dir):
    """Every scalar TensorBoard shows for the run, but the wall-clock ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag not in ("epoch/time_s", "epoch/samples_per_s")}


def test_what_does_not_fit_the_task_is_refused_before_training(task_files, tiny_root, tmp_path):
    out = f"output_root={tmp_path}"
    values = ("dataset=tensors", f"dataset.path={task_files}/values.npz", *SMALL, out)
    refused = train_in_process("task=regression", "loss=cross_entropy", *values)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: loss=CrossEntropy is a loss for classification, not task=regression")
    negative = tmp_path / "negative.npz"
    data = dict(np.load(f"{task_files}/counts.npz"))
    data["train_y"][:100] = -1  # some in the training split, whichever 60 validation holds
    np.savez(negative, **data)
    refused = train_in_process("task=regression", "loss=poisson_nll", "dataset=tensors", f"dataset.path={negative}",
                               *SMALL, out)
    assert refused.stderr == ("error: loss=PoissonNLLLoss: the training targets hold -1, a negative value; Poisson NLL "
                              "is for counts (>= 0): use loss=mse, l1 or huber\n")
    refused = train_in_process("task=embedding", *TINY, f"dataset.root={tiny_root}", *SMALL, "dataset.batch_size=1",
                               out)
    assert refused.stderr == ("error: dataset.batch_size=1: a batch must hold two images of a class for "
                              "loss=MinedTripletLoss to compare; use a batch of several per class\n")
    refused = train_in_process("task=multilabel", "dataset=tensors", f"dataset.path={task_files}/values.npz",
                               *SMALL, out)
    assert refused.returncode == 1 and "multi-hot targets hold" in refused.stderr
    refused = train_in_process("task=regression", *TINY, f"dataset.root={tiny_root}", *SMALL, out)
    assert refused.stderr == ("error: dataset MNIST gives class labels only, and task=regression learns numbers: use "
                              "dataset=tensors (a .npz or .pt file of them) or dataset=image_folder with "
                              "dataset.labels=FILE.csv (docs/tasks.md)\n")
    assert not list(tmp_path.rglob("last.pt")) and not list(tmp_path.rglob(".hydra"))  # nothing of a run kept


def test_a_checkpoint_of_another_task_is_refused_by_resume_and_eval(task_files, tiny_root, straight_runs,
                                                                            tmp_path_factory, tmp_path):
    run_dir = straight("embedding", task_files, tiny_root, straight_runs, tmp_path_factory)
    ckpt = run_dir / "checkpoints" / "last.pt"
    overrides, _ = task_args("embedding", task_files, tiny_root)
    as_classifier = [o for o in overrides if not o.startswith(("task", "loss"))]
    refused = train_in_process(*as_classifier, "trainer.max_epochs=3", f"trainer.resume={ckpt}",
                               f"output_root={tmp_path}")
    assert refused.stderr == (f"error: trainer.resume={str(ckpt)!r} was trained for task=embedding, not "
                              "task=classification; resume it with task=embedding, or start a new run\n")
    evaluated = subprocess.run([sys.executable, "eval.py", f"ckpt={ckpt}", "dataset=tensors",
                                f"dataset.path={task_files}/values.npz", f"output_root={tmp_path}/out"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 1 and evaluated.stderr.count("\n") == 1 and "error:" in evaluated.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("name", ["regression", "multilabel", "embedding"])
def test_each_task_trains_under_torchrun_on_two_processes(name, task_files, tiny_root, tmp_path):
    import os

    overrides, key = task_args(name, task_files, tiny_root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *overrides, "dataset.batch_size=16", "trainer.max_epochs=1", f"output_root={tmp_path}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.json")
    found = json.loads(metrics.read_text())
    assert math.isfinite(found[key]) and found["world_size"] == 2


def test_summarize_shows_each_tasks_main_metric(task_files, tiny_root, straight_runs, tmp_path_factory, tmp_path):
    import shutil

    for name in ("regression", "multilabel"):
        run_dir = straight(name, task_files, tiny_root, straight_runs, tmp_path_factory)
        shutil.copytree(run_dir / ".hydra", tmp_path / name / ".hydra")
        shutil.copy(run_dir / "metrics.json", tmp_path / name / "metrics.json")
    shown = subprocess.run([sys.executable, "scripts/summarize.py", str(tmp_path), "--sort", "test/mae",
                            "--format", "csv"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()
    assert header.split(",")[:10] == ["run", "status", "test/acc", "test/loss", "test/f1", "best/val", "test/mae",
                                      "test/r2", "test/map", "epochs"]  # no test/knn_acc: no embedding run here
    assert [row.split(",")[0] for row in rows] == ["regression", "multilabel"]  # lower error first; none last


@pytest.mark.parametrize("preset, data, key", [("counts_poisson", "counts", "test/r2"),
                                               ("mnist_rotation", "rotation", "test/mae"),
                                               ("mnist_mosaic", "mosaic", "test/map")])
def test_the_presets_of_generated_data_run_end_to_end(preset, data, key, tiny_root, tmp_path):
    """Each preset on a small file of its generated dataset (the full ones and their results: docs/tasks.md)."""
    from trainer.cli.make_data import generate, read_mnist

    arrays = generate(data, 0, 300, 60, read_mnist(tiny_root) if data != "counts" else None)
    np.savez(tmp_path / f"{data}.npz", **arrays)
    result = run_train(f"experiment={preset}", f"dataset.path={tmp_path}/{data}.npz", "dataset.val_size=60",
                       "dataset.batch_size=16",
                       "debug=fast_dev_run", "trainer.device=cpu", f"output_root={tmp_path}/out")
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "out").rglob("metrics.json")
    assert math.isfinite(json.loads(metrics.read_text())[key])
