"""Resource failures end in one line, and no earlier checkpoint is lost: a full disk (before or during a run),
and learning rates that blow the weights up (inf is refused; 1e30 is stopped or drawn around)."""

from __future__ import annotations

import errno
import subprocess
import uuid

import pytest
import torch
from conftest import TINY, run_train, run_train_stopping

from trainer.errors import OutputError
from trainer.run import files as fsutil
from trainer.run.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the requested size (root only: the review's own way of filling a disk)."""
    mounts = []

    def mount(size: str):
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); test_a_full_disk_in_one_line "
                        "covers the same code path without one")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("size", ["300k", "8m"])
def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(tiny_root, small_disk, size):
    disk = small_disk(size)
    line = one_error_line(run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={disk}"))  # the default CNN
    assert "MiB free, but this run's checkpoints" in line and "output_root" in line, line
    assert not any(disk.iterdir())  # the refused run left nothing behind


def test_a_disk_filling_up_during_training_ends_in_one_line_and_keeps_the_last_checkpoint(tiny_root, small_disk):
    disk = small_disk("8m")
    result = run_train_stopping(*TINY, f"dataset.root={tiny_root}", f"output_root={disk}", "model=logistic",
                                "trainer.checkpoint_every_n_steps=4", "trainer.max_epochs=2",
                                env={"FILL_DISK_AT_STEP": "6"})
    line = one_error_line(result)
    assert "cannot write" in line and "No space left on device" in line and "intact" in line, line
    (checkpoints,) = disk.rglob("checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]  # no torn temporary file
    assert load_checkpoint(checkpoints / "last.pt")["global_step"] == 4  # the one before the disk filled


def test_a_full_disk_in_one_line(tmp_path, monkeypatch):
    """Without a tmpfs: the write fails the way a full disk fails it, through torch.save's own error."""
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "epoch": 1, "global_step": 10,
             "rng": {}, "config": "a: 1\n"}
    save_checkpoint(tmp_path / "last.pt", state)
    before = (tmp_path / "last.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path / 'last.pt'}: No space left on device; the file "
                                          "there before, if any, is intact$"):
        save_checkpoint(tmp_path / "last.pt", {**state, "epoch": 2})
    assert (tmp_path / "last.pt").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_refused(tiny_root, tmp_path, lr):
    line = one_error_line(run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "model=logistic",
                                    f"optimizer.lr={lr}"))
    assert (f"optimizer.lr={lr}: must be a finite number > 0" in line  # ours
            or f"lr={lr}" in line and "Invalid learning rate" in line), line  # torch's own check, for negative ones
    assert not any(tmp_path.iterdir())


def test_a_huge_learning_rate_stops_at_the_first_bad_batch_before_anything_reads_the_weights(tiny_root, tmp_path):
    line = one_error_line(run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}",
                                    "optimizer.lr=1e30", "dataset.batch_size=128"))  # CNN, 4 batches an epoch
    assert "training loss is nan at epoch 1, batch 2 (optimizer step 2)" in line, line
    assert not list(tmp_path.rglob("*.pt"))


def test_weights_beyond_the_histogram_range_are_not_drawn_and_the_run_goes_on(tiny_root, tmp_path):
    result = run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "model=logistic",
                       "optimizer.lr=1e30", "scheduler=none", "trainer.max_epochs=1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "weights/linear.weight at step 16 not drawn: values beyond +-1e+20" in result.stdout
