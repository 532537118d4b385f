"""The Trainer's own epoch metrics against torchmetrics, which defines them (the Trainer does not import it:
see trainer/loop/metrics.py), on random batches with absent classes, and across a state-dict roundtrip."""

import math

import pytest
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from trainer.errors import UserError
from trainer.loop.metrics import MAX_PENDING_LOGITS, EpochMetrics


def batches(seed, classes=10, sizes=(32, 32, 7, 64, 1), absent=(3, 7)):
    """(loss, logits, targets) batches in which the classes `absent` are never the target nor the prediction."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        logits = torch.randn(n, classes, generator=g)
        logits[:, list(absent)] = -1e9
        targets = torch.randint(0, classes, (n,), generator=g)
        for a in absent:
            targets[targets == a] = (a + 1) % classes
        out.append((torch.rand((), generator=g), logits, targets))
    return out


def reference(data, classes=10, top_k=None):
    loss, acc = MeanMetric(), MulticlassAccuracy(classes, average="micro")
    f1, confusion = MulticlassF1Score(classes, average="macro"), MulticlassConfusionMatrix(classes)
    balanced = MulticlassAccuracy(classes, average="macro")
    top = MulticlassAccuracy(classes, top_k=top_k, average="micro") if top_k else None
    for batch_loss, logits, targets in data:
        loss.update(batch_loss.repeat(len(targets)))
        for m in (acc, f1, confusion, balanced):
            m.update(logits.argmax(1), targets)
        if top is not None:
            top.update(logits, targets)
    scalars = {"x/loss": float(loss.compute()), "x/acc": float(acc.compute()), "x/f1": float(f1.compute()),
               "x/balanced_acc": float(balanced.compute())}
    if top is not None:
        scalars[f"x/acc_top{top_k}"] = float(top.compute())
    return scalars, confusion.compute()


@pytest.mark.parametrize("seed", range(5))
def test_loss_accuracy_f1_balanced_top_k_and_confusion_are_torchmetrics_values(seed):
    data = batches(seed)
    ours = EpochMetrics(10, torch.device("cpu"), confusion_matrix=True, top_k=3)
    for i, batch in enumerate(data):
        ours.add(*batch)
        if i == 1:
            ours.flush()  # one flush mid-way, as at a log interval
    want, confusion = reference(data, top_k=3)
    got = ours.compute("x")
    assert got == pytest.approx(want, rel=1e-6)
    assert torch.equal(ours.last_confusion, confusion)
    assert torch.equal(ours.last_targets, torch.cat([t for _, _, t in data]))
    assert torch.equal(ours.last_predictions, torch.cat([lo.argmax(1) for _, lo, _ in data]))
    assert ours.compute("x")["x/acc"] == 0.0  # compute() starts the next epoch from zero


def test_balanced_accuracy_weighs_each_class_alike():
    """90 samples of class 0, all right; 10 of class 1, all wrong: accuracy 0.9, balanced accuracy 0.5."""
    ours = EpochMetrics(2, torch.device("cpu"))
    targets = torch.tensor([0] * 90 + [1] * 10)
    ours.add(torch.tensor(0.0), torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 2).float(), targets)
    got = ours.compute("x")
    assert got["x/acc"] == pytest.approx(0.9) and got["x/balanced_acc"] == pytest.approx(0.5)


def test_top_k_is_off_where_k_covers_every_class():
    assert "x/acc_top5" not in EpochMetrics(5, torch.device("cpu"), top_k=5).names("x")
    assert "x/acc_top5" in EpochMetrics(6, torch.device("cpu"), top_k=5).names("x")


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 1.0), (2, 8.0)])
def test_full_metrics_are_torchmetrics_values(seed, scale):
    """Per-class precision, recall and F1, AUROC (macro and per class) and ECE. `scale` 8 makes a confident model
    (most top probabilities within 1e-4 of 1, as float32 logits), where histograms of probabilities would tie most
    samples in one bin: the histograms are of log-odds, so AUROC stays within 1e-3 of torchmetrics' exact value
    (computed from float64 logits, whose probabilities do not round to 1)."""
    from torchmetrics.classification import (
        MulticlassAUROC,
        MulticlassCalibrationError,
        MulticlassPrecision,
        MulticlassRecall,
    )

    classes = [f"c/{i}" for i in range(6)]  # a slash in a class name becomes "-" in its key
    data = [(loss, logits * scale, targets) for loss, logits, targets in batches(seed, 6, (64, 64, 33), absent=())]
    ours = EpochMetrics(6, torch.device("cpu"), confusion_matrix=True, full=True, classes=classes)
    for i, batch in enumerate(data):
        ours.add(*batch)
        if i == 0:
            ours.flush()
    got = ours.compute("x")
    logits, targets = torch.cat([lo for _, lo, _ in data]), torch.cat([t for _, _, t in data])
    want = {"precision": MulticlassPrecision(6, average=None)(logits, targets),
            "recall": MulticlassRecall(6, average=None)(logits, targets),
            "f1": MulticlassF1Score(6, average=None)(logits, targets),
            "auroc": MulticlassAUROC(6, average=None, thresholds=None)(logits.double(), targets)}
    for what, values in want.items():
        tolerance = 1e-3 if what == "auroc" else 1e-6
        assert [got[f"x/{what}/c-{i}"] for i in range(6)] == pytest.approx(values.tolist(), abs=tolerance), what
    assert got["x/auroc"] == pytest.approx(float(want["auroc"].mean()), abs=1e-3)
    ece = MulticlassCalibrationError(6, n_bins=15, norm="l1")(logits, targets)
    assert got["x/ece"] == pytest.approx(float(ece), abs=1e-5)
    count, _, _ = ours.last_calibration
    assert int(count.sum()) == len(targets)


def test_auroc_of_a_class_with_no_positive_is_nan_and_left_out_of_the_mean():
    ours = EpochMetrics(3, torch.device("cpu"), full=True)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    ours.add(torch.tensor(0.0), logits, torch.tensor([0, 1, 0, 1]))  # no sample of class 2
    got = ours.compute("x")
    assert math.isnan(got["x/auroc/2"])
    assert got["x/auroc"] == pytest.approx((got["x/auroc/0"] + got["x/auroc/1"]) / 2)


def test_many_logits_are_reduced_to_predictions_before_they_pile_up():
    ours = EpochMetrics(1000, torch.device("cpu"))
    per_batch = MAX_PENDING_LOGITS // (1000 * 256) + 1
    data = batches(0, classes=1000, sizes=(256,) * (per_batch + 1), absent=())
    for batch in data:
        ours.add(*batch)
    assert ours._logit_values <= MAX_PENDING_LOGITS and len(ours._preds) == 1
    assert ours.compute("x") == pytest.approx(reference(data, 1000)[0], rel=1e-6)


def test_auroc_memory_is_bounded_whatever_the_classes():
    """Histogram cells (x2 for positives and negatives) stay within MAX_AUROC_CELLS, 16 MiB of int64 at most."""
    from trainer.loop.metrics import MAX_AUROC_CELLS

    many = EpochMetrics(20_000, torch.device("cpu"), full=True)
    assert many.counts["scores"].numel() <= 2 * max(MAX_AUROC_CELLS, 16 * 20_000)
    assert EpochMetrics(10, torch.device("cpu"), full=True).auroc_bins == 2**14


def test_a_state_dict_of_another_form_is_refused_in_one_line():
    """A development version kept torchmetrics' states here; no released version wrote them, so a checkpoint
    holding them is refused, naming what it holds, instead of failing on a missing key."""
    old = {"metrics": {"loss": {}, "acc": {}, "f1": {}}, "losses": torch.zeros(0), "sizes": [],
           "preds": torch.zeros(0), "targets": torch.zeros(0)}
    with pytest.raises(UserError, match=r"unfinished epoch metrics \(metrics, losses, sizes, preds, targets\) are "
                                        r"not of this version's form"):
        EpochMetrics(10, torch.device("cpu")).load_state_dict(old)


def test_per_class_accuracy_of_a_class_with_no_sample_is_none_not_zero():
    from trainer.report.run_report import per_class_accuracy

    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]])  # no sample of class 1 (rows: true class)
    assert per_class_accuracy(confusion) == [0.75, None, 0.5]


def test_a_checkpoint_from_before_top_k_resumes_and_leaves_out_only_that_epochs_top_k(caplog):
    """A state without the top-k count (written before it was counted): at an epoch's end it loads as it is; in
    mid-epoch the epoch's other metrics are exact and its acc_top3 is left out with a warning (its hits before the
    checkpoint were never counted), and the next epoch has it again."""
    data = batches(0)
    old = EpochMetrics(10, torch.device("cpu"), top_k=3)
    for batch in data[:2]:
        old.add(*batch)
    state = old.state_dict()
    del state["counts"]["top_k"]
    ended = EpochMetrics(10, torch.device("cpu"), top_k=3)
    ended.load_state_dict({**EpochMetrics(10, torch.device("cpu"), top_k=3).state_dict(),
                           "counts": {k: v for k, v in ended.counts.items() if k != "top_k"}})
    assert not caplog.records
    resumed = EpochMetrics(10, torch.device("cpu"), top_k=3)
    resumed.load_state_dict(state)
    assert "left out" in caplog.text
    for batch in data[2:]:
        resumed.add(*batch)
    got, (want, _) = resumed.compute("x"), reference(data, top_k=3)
    assert got == pytest.approx({k: v for k, v in want.items() if k != "x/acc_top3"}, rel=1e-6)
    for batch in data:
        resumed.add(*batch)
    assert resumed.compute("x") == pytest.approx(want, rel=1e-6)
