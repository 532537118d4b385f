"""scripts/predict.py: image files in, classes out, converted the way the training images were made."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from data_args import tiny_mnist
from PIL import Image

from trainer.cli.predict import to_training_format  # noqa: E402


def predict(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_conversion_inverts_crops_fits_the_box_and_centres(tmp_path):
    page = np.full((300, 200), 250, dtype=np.uint8)  # white paper...
    page[40:140, 20:70] = 10  # ...with a dark 100x50 stroke off-centre
    Image.fromarray(page).convert("RGB").save(tmp_path / "ink.jpg")
    x = to_training_format(tmp_path / "ink.jpg", (1, 28, 28), box=20)
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8
    rows, cols = (x[0] > 128).nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 10)  # 100x50 fitted into 20x20
    assert abs(rows.float().mean() - 14) <= 1 and abs(cols.float().mean() - 14) <= 1  # centred, light on dark
    assert x[0, 0, 0] == 0


@pytest.mark.slow
def test_predict_classifies_real_digits_from_png_and_jpeg(real_root, real_cnn_epoch, tmp_path):
    run_dir = real_cnn_epoch  # one epoch of the default CNN, trained once for the suite
    test_x, test_y = tiny_mnist(real_root).test.raw()
    files, labels = [], []
    for i in range(40):  # MNIST test digits as a user would have them: dark ink on white, larger, in colour
        path = tmp_path / f"digit{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray((255 - test_x[i, 0]).numpy()).resize((84, 84)).convert("RGB").save(path)
        files.append(str(path))
        labels.append(int(test_y[i]))
    result = predict(f"{run_dir}/checkpoints/best.pt", *files, "--top", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    predicted = [int(line.split()[1]) for line in lines]
    assert sum(p == y for p, y in zip(predicted, labels)) >= 38, (predicted, labels)
    assert lines[0].startswith(files[0]) and lines[0].count("%") == 2 and f"'{labels[0]}'" in lines[0]

    (tmp_path / "notes.png").write_text("not an image")
    bad = predict(f"{run_dir}/checkpoints/best.pt", files[0], str(tmp_path / "notes.png"))
    assert bad.returncode == 1 and bad.stderr.startswith(f"error: {tmp_path / 'notes.png'}: not a readable image")
    assert len(bad.stderr.strip().splitlines()) == 1
