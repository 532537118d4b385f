"""The Trainer's own epoch metrics against torchmetrics, which defines them (the Trainer does not import it:
see trainer/loop/metrics.py), on random batches with absent classes, and across a state-dict roundtrip."""

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


def reference(data, classes=10):
    loss, acc = MeanMetric(), MulticlassAccuracy(classes, average="micro")
    f1, confusion = MulticlassF1Score(classes, average="macro"), MulticlassConfusionMatrix(classes)
    for batch_loss, logits, targets in data:
        loss.update(batch_loss.repeat(len(targets)))
        for m in (acc, f1, confusion):
            m.update(logits.argmax(1), targets)
    scalars = {"x/loss": float(loss.compute()), "x/acc": float(acc.compute()), "x/f1": float(f1.compute())}
    return scalars, confusion.compute()


@pytest.mark.parametrize("seed", range(5))
def test_loss_accuracy_f1_and_confusion_are_torchmetrics_values(seed):
    data = batches(seed)
    ours = EpochMetrics(10, torch.device("cpu"), confusion_matrix=True)
    for i, batch in enumerate(data):
        ours.add(*batch)
        if i == 1:
            ours.flush()  # one flush mid-way, as at a log interval
    want, confusion = reference(data)
    got = ours.compute("x")
    assert got == pytest.approx(want, rel=1e-6)
    assert torch.equal(ours.last_confusion, confusion)
    assert torch.equal(ours.last_targets, torch.cat([t for _, _, t in data]))
    assert torch.equal(ours.last_predictions, torch.cat([lo.argmax(1) for _, lo, _ in data]))
    assert ours.compute("x")["x/acc"] == 0.0  # compute() starts the next epoch from zero


def test_many_logits_are_reduced_to_predictions_before_they_pile_up():
    ours = EpochMetrics(1000, torch.device("cpu"))
    per_batch = MAX_PENDING_LOGITS // (1000 * 256) + 1
    data = batches(0, classes=1000, sizes=(256,) * (per_batch + 1), absent=())
    for batch in data:
        ours.add(*batch)
    assert ours._logit_values <= MAX_PENDING_LOGITS and len(ours._preds) == 1
    assert ours.compute("x") == pytest.approx(reference(data, 1000)[0], rel=1e-6)


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
