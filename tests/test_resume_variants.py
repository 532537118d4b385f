"""Bitwise resume beyond the MLP + one-cycle runs of test_resume.py, in-process: epoch schedules (plateau, step),
gradient accumulation, early stopping armed, a batch-norm CNN, the balanced sampler with class weights on a fold,
and data over the memory budget, each resumed mid-epoch and at an epoch's end.

The uninterrupted run keeps a copy of its run directory's checkpoints (last.pt, and best.pt so far) at the chosen
moment; a new Trainer (seeded as train.py seeds it, then given the checkpoint's RNGs) resumes from that copy and
must end bit for bit where the uninterrupted run ended: weights, buffers (batch-norm statistics), optimizer state,
counters, and the test metrics of best.pt.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, TINY
from hydra import compose, initialize_config_dir

from trainer.cli import train
from trainer.loop.trainer import Trainer

# pytest-xdist: this module's tests share module-scoped runs, so they run in one worker
pytestmark = pytest.mark.xdist_group("resume_variants")

# 500 training images in batches of 32: 16 batches an epoch; a checkpoint after every optimizer step.
COMMON = (*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "trainer.checkpoint_every_n_steps=1",
          "trainer.log_every_n_steps=3", "model.dropout=0.2", "dataset.augment_shift=2", "optimizer=sgd",
          "optimizer.lr=0.05")
VARIANTS = {  # overrides, optimizer steps per epoch
    "plateau": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=plateau", "scheduler.patience=0"), 16),
    "step": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=step", "scheduler.step_size=1"), 16),
    "accumulation": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=onecycle",
                      "trainer.accumulate_grad_batches=3"), 6),
    # min_delta 1: no epoch counts as an improvement, so the run stops after 2 epochs of patience 1... of 3
    "early stopping": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=none", "trainer.early_stopping_patience=1",
                        "trainer.early_stopping_min_delta=1.0"), 16),
    "batch-norm CNN": (("model=cnn", "model.channels=[4,8]", "model.hidden=16", "model.batch_norm=true",
                        "scheduler=cosine"), 16),
    # the balanced sampler's draws with replacement, class weights, and fold 3 of 4 (450 training images: 15 batches)
    "balanced k-fold": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=onecycle", "dataset.sampler=balanced",
                         "loss.class_weights=auto", "dataset.folds=4", "dataset.fold=3"), 15),
    # over the memory budget (faint MNIST's 612 KiB over 300 KiB): windows of 3 batches of the memory-mapped cache, so
    # the mid-epoch checkpoint (step 2 of the epoch) resumes inside one
    "beyond memory": (("model=mlp", "model.hidden_sizes=[64]", "scheduler=onecycle",
                       f"dataset.memory_budget_gib={300 * 2**-20}"), 16),
    # EMA of parameters and batch-norm buffers, with the warm-up: "model" is the average, "train_model" the weights
    "EMA": (("model=cnn", "model.channels=[4,8]", "model.hidden=16", "model.batch_norm=true", "scheduler=onecycle",
             "trainer.ema_decay=0.9", "trainer.ema_warmup=true"), 16),
}


def config(root, out, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[*COMMON, f"dataset.root={root}", f"output_root={out}", *overrides])


def final(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return state, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module", params=list(VARIANTS))
def straight(request, faint_root, tmp_path_factory):
    """The uninterrupted run of a variant, with copies of its checkpoints as written mid-epoch 2 and at epoch 1's end
    (each copy in a directory of its own that looks like a run directory, so a resume continues there)."""
    overrides, steps = VARIANTS[request.param]
    base = tmp_path_factory.mktemp("variant")
    moments = {"mid-epoch": (steps + 2, True), "epoch end": (steps, False)}  # (global step, mid-epoch?)
    copies = {}
    save = Trainer.save_checkpoint

    def saving(self, name):
        path = save(self, name)
        for moment, (step, mid) in moments.items():
            if name == "last.pt" and self.progress.global_step == step and (self.progress.batch_in_epoch > 0) == mid:
                copy = base / f"resumed {moment}"
                shutil.copytree(path.parent, copy / "checkpoints")
                (copy / ".hydra").mkdir()
                copies[moment] = copy / "checkpoints" / "last.pt"
        return path

    Trainer.save_checkpoint = saving
    try:
        train.train(config(faint_root, base / "out", *overrides), base / "straight")
    finally:
        Trainer.save_checkpoint = save
    assert set(copies) == set(moments)
    return request.param, base, copies


@pytest.mark.parametrize("moment", ["mid-epoch", "epoch end"])
def test_resume_is_bitwise_exact(straight, faint_root, moment):
    variant, base, copies = straight
    overrides, _ = VARIANTS[variant]
    resumed_dir = copies[moment].parent.parent  # the run continues in the directory the checkpoint is in
    train.train(config(faint_root, base / "out", *overrides, f"trainer.resume={copies[moment]}"), base / "unused")
    (a, ma), (b, mb) = final(base / "straight"), final(resumed_dir)
    assert (a["epoch"], a["global_step"], a["batch_in_epoch"]) == (b["epoch"], b["global_step"], b["batch_in_epoch"])
    if variant == "early stopping":
        assert a["epoch"] == 2 and a["epochs_without_improvement"] == 1  # it did stop early (patience 1), in both
    weights = ("model", "train_model") if variant == "EMA" else ("model",)
    assert set(weights) <= set(a) and set(weights) <= set(b) and ("ema_updates" in a) == (variant == "EMA")
    for w in weights:
        for k in a[w]:  # parameters and buffers (running mean/var, batches tracked)
            assert torch.equal(a[w][k], b[w][k]), f"{w} {k} differs"
    if variant == "EMA":
        assert int(a["ema_updates"]) == int(b["ema_updates"]) == a["global_step"]
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}.{k} differs"
    assert a["scheduler"] == b["scheduler"] and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for k in ("test/loss", "test/acc", "test/f1", "best/val/acc", "best/epoch", "epochs", "global_step"):
        assert ma[k] == mb[k], k
