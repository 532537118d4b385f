"""`python train.py ...` end to end, as a user runs it: outputs, TensorBoard, resume, bad input."""

import hashlib
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run_train


def tiny(root, run_dir, *more):
    return [*TINY, f"dataset.root={root}", f"hydra.run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    result = run_train(*tiny(tiny_root, run_dir, "model=mlp", "trainer.max_epochs=3", "scheduler=step",
                                     "dataset.augment_shift=2"))
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_run_writes_checkpoints_metrics_and_tensorboard(finished_run):
    run_dir, result = finished_run
    assert "epoch 3/3" in result.stdout and "test/acc" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.9  # the tiny dataset is easy: a broken pipeline would not learn it
    assert metrics["epochs"] == 3 and metrics["global_step"] == 3 * 16
    assert 0 < metrics["seconds_since_start"] < 600 and metrics["peak_rss_mib"] > 0
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "model:\n  _target_: trainer.models.mlp.MLP" in ckpt["config"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1", "test/loss", "test/acc", "test/f1",
            "epoch/time_s", "epoch/samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 49, 5))  # every log_every_n_steps
    assert [e.step for e in events.Scalars("val/acc")] == [16, 32, 48]
    assert events.Scalars("test/acc")[0].value == pytest.approx(metrics["test/acc"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_resume_continues_at_the_right_epoch_with_the_same_state(tiny_root, tmp_path):
    straight, part = tmp_path / "straight", tmp_path / "part"
    common = ("model=mlp", "scheduler=step", "trainer.deterministic=true")
    assert run_train(*tiny(tiny_root, straight, *common, "trainer.max_epochs=3")).returncode == 0
    assert run_train(*tiny(tiny_root, part, *common, "trainer.max_epochs=1")).returncode == 0
    resumed = run_train(*tiny(tiny_root, tmp_path / "resume_invocation", *common, "trainer.max_epochs=3",
                              f"trainer.resume={part}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at epoch 1 (step 16)" in resumed.stdout
    assert "config changed, trainer.max_epochs: 1 -> 3" in resumed.stdout
    assert "epoch 1/3" not in resumed.stdout and "epoch 2/3" in resumed.stdout
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)  # the run continued in its own directory
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, 48)
    for k in a["model"]:  # same data order, RNG and optimizer state: the same weights, bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"] if "momentum_buffer" in s else s["exp_avg"],
                           b["optimizer"]["state"][k]["momentum_buffer" if "momentum_buffer" in s else "exp_avg"])
    events = EventAccumulator(str(part))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [16, 32, 48]  # one curve, no duplicated steps


def tree_digest(path):
    return {str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


BAD = [
    (["model=foo"], "Could not find 'model/foo'", "mlp"),  # Hydra lists the choices
    (["optimizer=adamm"], "Could not find 'optimizer/adamm'", "adamw"),
    (["trainer.max_epoch=3"], "trainer.max_epoch", "not in struct"),
    (["optimizer.lr=-0.1"], "lr=-0.1", "Invalid learning rate"),
    (["optimizer.lr=abc"], "lr=abc", "optimizer"),
    (["dataset.batch_size=0"], "dataset.batch_size=0", ">= 1"),
    (["dataset.batch_size=ten"], "dataset.batch_size='ten'", "integer"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", ">= 1"),
    (["trainer.device=cuda"], "trainer.device='cuda'", "CUDA is not available"),
    (["trainer.device=tpu"], "trainer.device='tpu'", "cpu, cuda"),
    (["trainer.monitor=val/accuracy"], "trainer.monitor='val/accuracy'", "val/acc"),
    (["trainer.mode=up"], "trainer.mode='up'", "min or max"),
    (["trainer.resume=/nonexistent/last.pt"], "/nonexistent/last.pt", "does not exist"),
    (["seed=-1"], "seed=-1", ">= 0"),
    (["trainer.precision=fp16"], "trainer.precision=fp16", "needs CUDA"),
    (["trainer.precision=fp8"], "trainer.precision='fp8'", "bf16"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", ">= 1"),
    (["trainer.num_threads=0"], "trainer.num_threads=0", ">= 1"),
    (["trainer.max_epochs=1", "scheduler=onecycle", "trainer.limit_train_batches=3"], "scheduler=onecycle",
     "warm-up steps"),
    (["model.activation=Relu"], "'Relu'", "GELU"),
    (["dataset.root=/nonexistent/data", "dataset.download=false"], "/nonexistent/data", "provision_data.py"),
]


@pytest.mark.parametrize("overrides, names_value, says", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_clear_line_and_earlier_run_untouched(finished_run, tiny_root, tmp_path, overrides,
                                                            names_value, says):
    earlier, _ = finished_run
    before = tree_digest(earlier)
    result = run_train(*tiny(tiny_root, tmp_path / "bad", "model=mlp", *overrides))
    assert result.returncode != 0
    assert names_value in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(earlier) == before


def test_resume_from_another_model_names_the_difference(finished_run, tiny_root, tmp_path):
    earlier, _ = finished_run
    result = run_train(*tiny(tiny_root, tmp_path / "bad", "model=logistic",
                             f"trainer.resume={earlier}/checkpoints/last.pt"))
    assert result.returncode != 0 and "cannot resume" in result.stderr and "model._target_" in result.stderr


def test_resume_from_a_non_checkpoint(tiny_root, tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    result = run_train(*tiny(tiny_root, tmp_path / "bad", f"trainer.resume={tmp_path}/junk.pt"))
    assert result.returncode != 0 and "not a readable checkpoint" in result.stderr
