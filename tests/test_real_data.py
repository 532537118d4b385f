"""Short real-data runs through train.py, asserting the accuracy floors users are promised (1 epoch each)."""

import json

import pytest

from conftest import run_train

FLOORS = [  # (overrides, test accuracy floor after one epoch on this framework's defaults)
    (["model=logistic"], 0.91),
    (["model=mlp"], 0.97),
    (["model=cnn", "optimizer=adam"], 0.985),
    (["model=cnn", "dataset=fashion_mnist"], 0.88),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, floor", FLOORS, ids=[" ".join(o) for o, _ in FLOORS])
def test_one_epoch_reaches_the_floor(real_root, tmp_path, overrides, floor):
    result = run_train(*overrides, "trainer.max_epochs=1", f"dataset.root={real_root}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    acc = json.loads((tmp_path / "metrics.json").read_text())["test/acc"]
    print(f"{' '.join(overrides)}: test/acc {acc:.4f} (floor {floor})")
    assert acc >= floor
