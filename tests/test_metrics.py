"""The Trainer's own epoch metrics against torchmetrics, which defines them (the Trainer does not import it:
see trainer/metrics.py), on random batches with absent classes, and across a state-dict roundtrip."""

import pytest
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from trainer.metrics import MAX_PENDING_LOGITS, EpochMetrics


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
    return {"x/loss": float(loss.compute()), "x/acc": float(acc.compute()), "x/f1": float(f1.compute())}, confusion.compute()


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


def test_a_state_dict_of_the_torchmetrics_era_loads(tmp_path):
    """A mid-epoch checkpoint written when torchmetrics held the counts: its states are mapped onto ours."""
    data = batches(1)
    loss, acc, f1 = MeanMetric(), MulticlassAccuracy(10, average="micro"), MulticlassF1Score(10, average="macro")
    for m in (loss, acc, f1):
        m.persistent(True)
    for batch_loss, logits, targets in data[:2]:  # flushed before the checkpoint
        loss.update(batch_loss.repeat(len(targets)))
        acc.update(logits.argmax(1), targets)
        f1.update(logits.argmax(1), targets)
    pending = data[2:4]  # buffered at the checkpoint
    old = {"metrics": {"loss": dict(loss.state_dict()), "acc": dict(acc.state_dict()), "f1": dict(f1.state_dict())},
           "losses": torch.stack([b[0] for b in pending]), "sizes": [len(b[2]) for b in pending],
           "preds": torch.cat([b[1].argmax(1) for b in pending]), "targets": torch.cat([b[2] for b in pending])}
    torch.save(old, tmp_path / "old.pt")
    resumed = EpochMetrics(10, torch.device("cpu"))
    resumed.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    resumed.add(*data[4])
    assert resumed.compute("x") == pytest.approx(reference(data)[0], rel=1e-6)


def test_per_class_accuracy_of_a_class_with_no_sample_is_none_not_zero():
    from trainer.metrics import per_class_accuracy

    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]])  # no sample of class 1 (rows: true class)
    assert per_class_accuracy(confusion) == [0.75, None, 0.5]
