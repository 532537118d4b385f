"""Short real-data runs through train.py, asserting the accuracy floors users are promised."""

import json

import pytest
from conftest import CNN_EPOCH, run_train

# (overrides, test accuracy floor): one epoch on the defaults; the mnist_fast preset; the logistic and MLP presets,
# which must beat the Fashion-MNIST paper's baselines (the CNN presets take 12-35 min: measured, in docs/configs.md)
FLOORS = [
    (["model=logistic", "trainer.max_epochs=1"], 0.91),
    (["model=mlp", "trainer.max_epochs=1"], 0.97),
    (list(CNN_EPOCH), 0.985),  # the suite's shared run (conftest.real_cnn_epoch), which test_predict reads too
    (["model=cnn", "dataset=fashion_mnist", "trainer.max_epochs=1"], 0.88),
    (["experiment=mnist_fast"], 0.99),  # its 8 s budget is measured by scripts/benchmark.py, never asserted in a test
    (["experiment=mnist_logistic"], 0.917),
    (["experiment=fashion_logistic"], 0.842),
    (["experiment=mnist_mlp"], 0.972),
    (["experiment=fashion_mlp"], 0.871),
    # The two *_best presets take 13-20 min in full (docs/configs.md); here 150 batches of one epoch under the same
    # recipe, about 25 s each. Measured at seed 42 (seeds 0 and 1): mnist_best 98.54% (98.70%, 98.48%),
    # fashion_best 82.13% (seed 1: 82.92%).
    (["experiment=mnist_best", "trainer.max_epochs=1", "trainer.limit_train_batches=150"], 0.982),
    (["experiment=fashion_best", "trainer.max_epochs=1", "trainer.limit_train_batches=150"], 0.815),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, floor", FLOORS, ids=[" ".join(o) for o, _ in FLOORS])
def test_run_reaches_the_floor(real_root, tmp_path, overrides, floor, request):
    if tuple(overrides) == CNN_EPOCH:
        run_dir = request.getfixturevalue("real_cnn_epoch")
    else:
        result = run_train(*overrides, f"dataset.root={real_root}", f"hydra.run.dir={tmp_path}")
        assert result.returncode == 0, result.stderr
        run_dir = tmp_path
    acc = json.loads((run_dir / "metrics.json").read_text())["test/acc"]
    print(f"{' '.join(overrides)}: test/acc {acc:.4f} (floor {floor})")
    assert acc >= floor
