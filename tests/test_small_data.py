"""A user's first small folder trains with the defaults: one-cycle scales its warm-up down to the run, and a last
training batch of one image (which BatchNorm cannot train on) is dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_train
from data_args import common
from image_data import arrays, mixed_folder

from trainer.data import TensorsFile
from trainer.loop import schedulers


def lrs_of(total_steps: int, pct_start: float = 0.25) -> list[float]:
    """The LR of each step of a one-cycle run of `total_steps` steps (max_lr 1, div_factor 10)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    schedule = schedulers.onecycle(optimizer, steps_per_epoch=total_steps, max_epochs=1, max_lr=1.0,
                                   pct_start=pct_start, div_factor=10.0, final_div_factor=100.0,
                                   anneal_strategy="cos", cycle_momentum=True)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_batch()
    return lrs


@pytest.mark.parametrize("total_steps", [1, 2])
def test_onecycle_of_one_or_two_steps_trains_at_max_lr(total_steps):
    assert lrs_of(total_steps) == [1.0] * total_steps


@pytest.mark.parametrize("total_steps", [3, 4, 5, 7])
def test_onecycle_of_a_short_run_warms_up_over_two_steps(total_steps):
    lrs = lrs_of(total_steps)
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(1.0)  # the initial LR, then the peak
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < lrs[1]  # then the anneal


def test_onecycle_of_a_long_enough_run_keeps_its_pct_start():
    lrs = lrs_of(16)
    assert lrs.index(max(lrs)) == 3  # pct_start 0.25 of 16 steps: the peak at step 3, as configured


def test_a_last_training_batch_of_one_image_is_dropped(tmp_path):
    x, y = arrays(41, 3, 8, 8)  # 8 held out (val, test): 33 training images
    np.savez(tmp_path / "a.npz", train_x=x, train_y=y)
    for batch_size, batches in ((32, [32]), (16, [16, 16]), (11, [11, 11, 11]), (10, [10, 10, 10, 3])):
        data = TensorsFile(**common(path=str(tmp_path / "a.npz"), batch_size=batch_size, val_size=4, test_size=4,
                                      cache=False))
        assert data.train.num_items == 33
        assert [len(labels) for _, labels in data.train] == batches  # 33 = 32 + 1 = 2 * 16 + 1: the lone one dropped


@pytest.mark.parametrize(("images", "extra"), [(45, ()), (200, ("trainer.max_epochs=1",))])
def test_the_readme_image_folder_line_trains_a_small_folder(tmp_path, images, extra):
    """README: `python train.py dataset=image_folder dataset.path=/path/to/photos`, on a first folder of 45 images
    (5 epochs of one step), and on one of 200 with one epoch (2 steps); mixed PNG and JPEG of three sizes."""
    folder = mixed_folder(tmp_path / "photos", ["cat", "dog", "fish"], images)
    result = run_train("dataset=image_folder", f"dataset.path={folder}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "test/acc" in out and "scheduler=onecycle: a " in out
