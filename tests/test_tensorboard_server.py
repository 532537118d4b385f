"""TensorBoard's own server reads a finished run's scalars over its HTTP data API."""

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY, run_train
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, post: dict | None = None, raw: bool = False):
    data = json.dumps(post).encode() if post is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return r.read() if raw else json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_serves_the_run(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(*TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={run_dir}", "model=logistic",
                     "trainer.max_epochs=2").returncode == 0
    port = free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen([str(tensorboard), "--logdir", str(tmp_path), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the server is up once it lists our run with its scalars
            try:
                tags = get(f"{base}/data/plugin/scalars/tags")
                if "run" in tags and "val/acc" in tags["run"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not serve the run within 60 s"
            time.sleep(0.5)
        assert {"train/loss", "lr", "val/loss", "val/acc", "test/acc"} <= set(tags["run"])
        points = get(f"{base}/data/plugin/scalars/scalars?run=run&tag=val/acc")
        assert [step for _, step, _ in points] == [16, 32]
        assert all(0.0 <= value <= 1.0 for _, _, value in points)

        # The HParams tab: the run's hyperparameters, and its real final metrics (not a placeholder)
        experiment = get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"model", "optimizer", "optimizer.lr", "dataset.batch_size", "scheduler", "seed"} <= names
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"test/acc", "test/loss", "best/val/acc"}
        groups = get(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "test/acc"}}, {"hparam": "model"}]})["sessionGroups"]
        assert len(groups) == 1 and groups[0]["hparams"]["model"] == "LogisticRegression"
        test_acc = json.loads((run_dir / "metrics.json").read_text())["test/acc"]
        (value,) = [m["value"] for m in groups[0]["metricValues"] if m["name"]["tag"] == "test/acc"]
        assert value == pytest.approx(test_acc)

        # Images: the input grid once, the confusion matrix each epoch and at the test, as real PNGs
        images = get(f"{base}/data/plugin/images/tags")["run"]
        assert {"inputs/train", "val/confusion_matrix", "test/confusion_matrix"} <= set(images)
        entries = get(f"{base}/data/plugin/images/images?run=run&tag=val/confusion_matrix&sample=0")
        assert [e["step"] for e in entries] == [16, 32]
        png = get(f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}", raw=True)
        with Image.open(io.BytesIO(png)) as picture:
            assert picture.format == "PNG" and picture.width > 200 and picture.height > 200
        # Histograms of weights and gradients each epoch, and the model graph
        histograms = get(f"{base}/data/plugin/histograms/tags")["run"]
        assert {"weights/linear.weight", "grads/linear.weight"} <= set(histograms)
        series = get(f"{base}/data/plugin/histograms/histograms?run=run&tag=grads/linear.weight")
        assert [step for _, step, _ in series] == [16, 32]
        assert "run" in get(f"{base}/data/plugin/graphs/info")
    finally:
        server.terminate()
        server.wait(timeout=30)
