"""A stopped run is always resumable, whatever it was doing; a finished run can be given more epochs.

- A SIGINT/SIGTERM during validation, the final test, the graph and hparams logging or the metrics.json
  write leaves a run that `trainer.resume=auto` finishes (a run that finished training resumes straight
  into its test).
- Every scheduler continues when a finished run is resumed with a larger `trainer.max_epochs`: from the
  resumed step on, the LR is the one a run planned with the new length from the start would use.
"""

from __future__ import annotations

import json
import math
import shlex
import signal

import pytest
import torch
from conftest import TINY, run_train, run_train_stopping
from data_args import tiny_mnist
from test_trainer_loop import OPTIONS, RecordingLogger, linear

from trainer.loop import schedulers
from trainer.loop.options import TrainerOptions
from trainer.loop.trainer import Trainer


@pytest.mark.parametrize("phase", ["val", "test", "log_graph", "log_hparams", "metrics_json"])
def test_a_signal_in_any_phase_leaves_a_run_that_resume_auto_finishes(tiny_root, tmp_path, phase):
    overrides = (*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "model=logistic",
                 "trainer.max_epochs=2")
    stopped = run_train_stopping(*overrides, env={"SIGNAL_DURING": phase, "STOP_SIGNAL": str(int(signal.SIGINT))})
    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("stopped") and lines[1].startswith("resume with: python train.py"), \
        stopped.stderr
    assert "second signal" not in stopped.stderr and "Traceback" not in stopped.stderr
    (run,) = [p.parent for p in tmp_path.rglob(".hydra")]
    assert not (run / "metrics.json").exists()
    resumed = run_train(*overrides, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing {run}/checkpoints/last.pt" in resumed.stdout
    if phase != "val":  # training was over: only the test runs
        assert "running just the test" in resumed.stdout and "epoch 2/2" not in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["test/acc"] > 0.9
    if phase == "test":  # finished now: auto starts a fresh run
        again = run_train(*overrides, "trainer.resume=auto")
        assert again.returncode == 0 and "no unfinished run" in again.stdout, again.stderr


def test_a_finished_and_tested_run_is_not_resumed_again(tiny_root, tmp_path):
    overrides = (*TINY, f"dataset.root={tiny_root}", "model=logistic", "trainer.max_epochs=2")
    assert run_train(*overrides, f"hydra.run.dir={tmp_path}/run").returncode == 0
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    # best.pt may be an earlier epoch's (here epoch 1 of 2): it too would re-train a tested run's epochs
    for name in ("last.pt", "best.pt"):
        result = run_train(*overrides, f"trainer.resume={tmp_path}/run/checkpoints/{name}", f"output_root={tmp_path}")
        says = "its run finished 2 epochs and was tested; raise trainer.max_epochs (now 2) above 2"
        assert result.returncode == 1 and says in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the refused run left no directory
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


SCHEDULES = {
    "none": lambda o, **kw: schedulers.none(o, **kw),
    "step": lambda o, **kw: schedulers.step(o, step_size=1, gamma=0.5, **kw),
    "multistep": lambda o, **kw: schedulers.multistep(o, milestones=[1, 2], gamma=0.1, **kw),
    "exponential": lambda o, **kw: schedulers.exponential(o, gamma=0.5, **kw),
    "plateau": lambda o, **kw: schedulers.plateau(o, mode="max", factor=0.5, patience=0, threshold=0.5, min_lr=0.0,
                                                  **kw),
    "cosine": lambda o, **kw: schedulers.cosine(o, eta_min=0.001, **kw),
    "onecycle": lambda o, **kw: schedulers.onecycle(o, max_lr=0.5, pct_start=0.25, div_factor=10.0,
                                                    final_div_factor=100.0, anneal_strategy="cos", cycle_momentum=True,
                                                    **kw),
    "warmup": lambda o, **kw: schedulers.warmup(o, warmup_steps=6, **kw),
}


class EndOfRunLogger(RecordingLogger):
    """Also takes what test() logs."""

    def log_confusion_matrix(self, *args):
        pass

    def log_hparams(self, *args):
        pass


def trained(tiny_root, run_dir, make_schedule, max_epochs, resume=None):
    """A real Trainer over 4 steps an epoch; returns the (lr, momentum) each optimizer step used, by step."""
    torch.manual_seed(0)
    data = tiny_mnist(tiny_root, batch_size=125, eval_batch_size=100, val_size=100, mean=0.13, std=0.31)
    model = linear()
    logs = []
    settings = dict(OPTIONS, max_epochs=max_epochs, grad_clip_norm=None, monitor="val/acc", mode="max",
                    checkpoint_dir="checkpoints", resume=resume, deterministic=True)
    trainer = Trainer(model=model, loss_fn=torch.nn.CrossEntropyLoss(),
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), scheduler=make_schedule,
                      data=data, logger=lambda **kw: logs.append(EndOfRunLogger(**kw)) or logs[-1], run_dir=run_dir,
                      device=torch.device("cpu"), options=TrainerOptions.from_settings(settings))
    trainer.fit()
    trainer.test()
    scalars = logs[0].scalars
    return {step: (lr, dict(scalars["momentum"])[step]) for step, lr in scalars["lr"]}


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_finished_run_given_more_epochs_follows_the_longer_runs_schedule(tiny_root, tmp_path, name):
    (tmp_path / "short" / ".hydra").mkdir(parents=True)  # a run directory, so the resume continues it
    short = trained(tiny_root, tmp_path / "short", SCHEDULES[name], max_epochs=2)
    extended = trained(tiny_root, tmp_path / "elsewhere", SCHEDULES[name], max_epochs=3,
                       resume=str(tmp_path / "short" / "checkpoints" / "last.pt"))
    planned = trained(tiny_root, tmp_path / "planned", SCHEDULES[name], max_epochs=3)
    assert sorted(short) == list(range(1, 9)) and sorted(extended) == list(range(9, 13))
    for step in range(9, 13):
        assert extended[step] == pytest.approx(planned[step], rel=1e-9), (step, extended[step], planned[step])
        assert math.isfinite(extended[step][0])
    if name in ("cosine", "onecycle"):  # the curve was re-planned: the short run's last LR is not where it goes on
        assert short[8][0] != pytest.approx(extended[9][0], rel=0.05)
    else:  # nothing depends on the run's length: the two runs are one
        assert short == {s: planned[s] for s in range(1, 9)}


def test_resume_auto_names_the_unfinished_runs_it_passes_over(tiny_root, tmp_path):
    overrides = (*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "model=logistic",
                 "trainer.max_epochs=2")
    for _ in range(2):  # two unfinished runs of the same command
        stopped = run_train_stopping(*overrides, env={"STOP_AT_STEP": "3", "STOP_SIGNAL": str(int(signal.SIGINT))})
        assert stopped.returncode == 130, stopped.stderr
    older, newer = sorted(p.parent for p in tmp_path.rglob(".hydra"))
    resumed = run_train(*overrides, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"2 unfinished runs with these overrides; continuing the newest, {newer}/checkpoints/last.pt, and passing "
            f"over {older}/checkpoints/last.pt") in resumed.stdout
    assert (newer / "metrics.json").is_file() and not (older / "metrics.json").exists()


def test_the_printed_resume_command_of_a_stopped_sweep_job_works_as_printed(tiny_root, tmp_path):
    """A sweep job's directory (`0_...,model=logistic,...`) holds `=` and `,`: the hint quotes the path for Hydra."""
    stopped = run_train_stopping("-m", *TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}",
                                 "model=logistic", "trainer.max_epochs=2",
                                 env={"STOP_AT_STEP": "3", "STOP_SIGNAL": str(int(signal.SIGINT))})
    assert stopped.returncode == 130, stopped.stderr
    hint = next(line for line in stopped.stderr.splitlines() if line.startswith("resume with: "))
    assert 'trainer.max_epochs=2/checkpoints/last.pt"' in hint, hint
    python, script, *args = shlex.split(hint.removeprefix("resume with: "))
    assert (python, script) == ("python", "train.py")
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr
    (finished,) = tmp_path.rglob("metrics.json")  # in the job's own directory
    assert finished.parent.name.startswith("0_") and json.loads(finished.read_text())["epochs"] == 2
