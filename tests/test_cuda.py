"""The GPU path, on a CUDA GPU; every test here is skipped where there is none (`pytest -m cuda` selects them).

`scripts/gpu_check.sh` runs this module on a GPU machine together with the benchmark's CUDA rows. It covers:
- fp16 with its gradient scaler (an overflowing step is skipped and the scale falls), bf16, fp32;
- torch.compile, channels-last, CUDA graphs;
- data kept on the device, and the fallback to host memory with pinned, non-blocking batch copies;
- bitwise resume on CUDA mid-epoch;
- eval, predict and export of a CUDA-trained checkpoint on a machine without CUDA;
- a one-GPU torchrun with nccl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MLP, REPO, TINY, run_train, run_train_stopping
from hydra import compose, initialize_config_dir
from PIL import Image

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

CUDA = (*(a for a in TINY if not a.startswith("trainer.device=")), "trainer.device=cuda")
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # the process sees no GPU: a CPU-only machine


def setup_trainer(root: Path, tmp_path: Path, *overrides: str):
    """The Trainer exactly as train.py builds it, in this process (train.setup)."""
    from trainer.cli import train

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*CUDA, f"dataset.root={root}", f"output_root={tmp_path}", *overrides])
    return train.setup(cfg, tmp_path / "run")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def trained(root: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_train(*CUDA, f"dataset.root={root}", f"hydra.run.dir={run_dir}", *overrides)
    assert result.returncode == 0, result.stderr
    return metrics(run_dir)


def test_fp16_skips_an_overflowing_step_and_lowers_the_scale(tiny_root, tmp_path):
    trainer = setup_trainer(tiny_root, tmp_path, *MLP, "trainer.precision=fp16")
    scale = trainer.scaler.get_scale()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    honest = trainer.loss_fn
    trainer.loss_fn = lambda logits, targets: honest(logits, targets) * 1e30  # finite, but its fp16 gradients are not
    images, targets = next(iter(trainer.data.train))
    trainer._forward_backward(images, targets, 0, 0)
    trainer._optimizer_step()
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # the step was skipped
    trainer.loss_fn = honest
    trainer._forward_backward(images, targets, 0, 1)
    trainer._optimizer_step()
    assert trainer.scaler.get_scale() == scale / 2  # grows back only after 2000 good steps
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer.logger.close()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_forward_pass_at_the_precision(tiny_root, tmp_path, precision, dtype):
    trainer = setup_trainer(tiny_root, tmp_path, f"trainer.precision={precision}")
    images, targets = next(iter(trainer.data.train))
    logits, loss = trainer._forward(images, targets)
    assert logits.dtype == dtype and loss.dtype == torch.float32 and images.is_cuda
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # the weights stay fp32
    trainer.logger.close()


@pytest.mark.parametrize("extra", [
    ("trainer.precision=fp16",),
    ("trainer.precision=bf16",),
    ("trainer.precision=bf16", "trainer.compile=true"),
    ("trainer.channels_last=false",),
    ("trainer.cuda_graphs=true", "scheduler.cycle_momentum=false"),
    ("trainer.cuda_graphs=true", "scheduler.cycle_momentum=false", "trainer.precision=bf16",
     "trainer.grad_clip_norm=1.0", "trainer.ema_decay=0.9", "optimizer=adamw"),
], ids=lambda extra: " ".join(extra))
def test_a_cnn_learns_on_cuda(tiny_root, tmp_path, extra):
    result = trained(tiny_root, tmp_path / "run", "trainer.max_epochs=2", *extra)
    assert result["test/acc"] >= 0.95, result
    assert result["cuda_max_allocated_mib"] > 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod.") for key in state["model"])  # compiled or not, plain keys
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_channels_last_model_and_input_on_cuda(tiny_root, tmp_path):
    trainer = setup_trainer(tiny_root, tmp_path, "trainer.channels_last=true")
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.is_cuda
    images, targets = next(iter(trainer.data.train))
    trainer.model.eval()
    with torch.no_grad():
        nhwc, _ = trainer._forward(images, targets)
        nchw = trainer.model.to(memory_format=torch.contiguous_format)(images)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-3, atol=1e-3)
    trainer.logger.close()


def test_cuda_graphs_capture_once_then_replay_and_match_eager(tiny_root, tmp_path):
    runs = {}
    for graphs in (False, True):
        trainer = setup_trainer(tiny_root, tmp_path / str(graphs), *MLP, "trainer.deterministic=true",
                                "scheduler.cycle_momentum=false", f"trainer.cuda_graphs={str(graphs).lower()}",
                                "trainer.max_epochs=2")
        trainer.fit()
        runs[graphs] = trainer
        trainer.logger.close()
    graphed = runs[True].graph
    batches = runs[True].batches_per_epoch
    assert graphed.eager_steps == 3 + 2 and graphed.replays == 2 * batches - 5  # warm-up, then each short batch
    for a, b in zip(runs[False].model.parameters(), runs[True].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same training, up to rounding
    assert runs[True].progress.global_step == runs[False].progress.global_step


def test_data_stays_on_the_gpu_when_it_fits(tiny_root, tmp_path):
    trainer = setup_trainer(tiny_root, tmp_path)
    assert trainer.data.train.images.is_cuda and trainer.data.test.images.is_cuda
    trainer.logger.close()


def test_data_too_big_for_the_margin_is_kept_in_host_memory_and_copied_pinned(tiny_root, tmp_path, monkeypatch):
    from trainer.data import batches as batches_module

    resident = setup_trainer(tiny_root, tmp_path / "resident")
    host = setup_trainer(tiny_root, tmp_path / "host", "dataset.device_margin_gib=1000000")
    assert not host.data.train.images.is_cuda and host.data.train.device.type == "cuda"
    sources = []
    to_device = batches_module.BatchLoader._to_device

    def recording(self, images, labels):
        sources.append((images.device.type, images.is_pinned()))
        return to_device(self, images, labels)

    monkeypatch.setattr(batches_module.BatchLoader, "_to_device", recording)
    for loader in (resident, host):
        loader.data.train.set_epoch(3)
    for (a, ya), (b, yb) in zip(resident.data.train, host.data.train):
        assert b.is_cuda and yb.is_cuda
        assert torch.equal(a, b) and torch.equal(ya, yb)  # the same batches, whichever memory holds the data
    assert sources and all(source == ("cpu", True) for source in sources if source[0] == "cpu")
    assert ("cpu", True) in sources
    for t in (resident, host):
        t.logger.close()
    result = trained(tiny_root, tmp_path / "run", "dataset.device_margin_gib=1000000")
    assert result["test/acc"] >= 0.95


def test_a_run_stopped_mid_epoch_on_cuda_resumes_bitwise(tiny_root, tmp_path):
    exact = (*MLP, "model.dropout=0.2", "dataset.augment_shift=2", "trainer.deterministic=true",
             "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=3", f"dataset.root={tiny_root}")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(*CUDA, *exact, f"hydra.run.dir={straight}").returncode == 0
    result = run_train_stopping(*CUDA, *exact, f"hydra.run.dir={stopped}",
                                env={"STOP_AT_STEP": "20", "STOP_SIGNAL": str(int(signal.SIGTERM))})
    assert result.returncode == 143, result.stderr
    mid = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert mid["global_step"] == 20 and mid["batch_in_epoch"] == 4  # mid-epoch
    assert mid["rng"]["cuda"], "the CUDA generator's state is saved"
    resumed = run_train(*CUDA, *exact, f"hydra.run.dir={tmp_path / 'session2'}",
                        f"trainer.resume={stopped}/checkpoints/last.pt")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (straight, stopped))
    assert a["global_step"] == b["global_step"] == 48
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for p, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][p][key]), (p, key)
    assert metrics(straight)["test/loss"] == metrics(stopped)["test/loss"]


def test_a_cuda_checkpoint_is_evaluated_predicted_and_exported_without_a_gpu(real_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train("trainer.device=cuda", "model=cnn", "trainer.precision=bf16", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=100", f"dataset.root={real_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    trained_acc = metrics(run_dir)["test/acc"]
    best = run_dir / "checkpoints" / "best.pt"
    env = {**os.environ, **NO_CUDA}

    evaluated = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={best}", f"data_root={real_root}",
                                f"output_root={tmp_path / 'eval'}"], cwd=REPO, capture_output=True, text=True,
                               env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    acc = float(evaluated.stdout.split("test/acc ")[1].split()[0])
    assert abs(acc - trained_acc) <= 0.002, (acc, trained_acc)  # bf16 on another device: a few images may flip

    from data_args import (
        tiny_mnist,  # the real test digits, as files a user would have: dark on white, larger
    )

    test_x, test_y = tiny_mnist(real_root).test.raw()
    files = []
    for i in range(20):
        files.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray((255 - test_x[i, 0]).numpy()).resize((84, 84)).convert("RGB").save(files[-1])
    predicted = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), str(best), *files], cwd=REPO,
                               capture_output=True, text=True, env=env, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    classes = [line.split()[1] for line in predicted.stdout.splitlines()]
    assert sum(c == str(int(y)) for c, y in zip(classes, test_y[:20])) >= 18, (classes, test_y[:20])

    exported = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), str(best), "--format",
                               "torchscript", "--batches", "2", "--data-root", str(real_root), "--out",
                               str(tmp_path / "export")], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert "same prediction" in exported.stdout, exported.stdout


def test_torchrun_on_one_gpu_joins_nccl_and_trains(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(REPO / "train.py"),
           *CUDA, f"dataset.root={tiny_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process (nccl)" in result.stdout + result.stderr
    summary = metrics(run_dir)
    assert summary["world_size"] == 1 and summary["test/acc"] >= 0.95
