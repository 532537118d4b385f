"""The exact-resume promise, end to end through train.py: a run killed at any step (mid-epoch included),
by SIGKILL, during a checkpoint write, or stopped by SIGINT/SIGTERM, resumes to parameters bitwise equal
to the run that was never interrupted, with the same TensorBoard scalars. Also: resume=auto, and two
runs with the same seed are identical."""

import json
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MLP, REPO, TINY, run_train, run_train_stopping
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# MLP with dropout and shifted inputs (both draw from the RNG), one-cycle (stepped per batch): 16 batches per
# epoch, checkpoints every 3 steps and train/loss every 5, so checkpoints fall between log points.
EXACT = (*TINY, *MLP, "model.dropout=0.2", "dataset.augment_shift=2", "scheduler=onecycle",
         "trainer.deterministic=true", "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=3")
STEPS = 3 * 16
TIMING = {"epoch/time_s", "epoch/samples_per_s"}  # wall-clock scalars: the only ones allowed to differ


def args(root, run_dir, *more):
    return [*EXACT, f"dataset.root={root}", f"hydra.run.dir={run_dir}", *more]


def scalars(run_dir):
    """Every scalar TensorBoard shows for the run (purged steps already dropped, as TensorBoard does)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMING}


def final(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_run(a_dir, b_dir):
    a, b = final(a_dir), final(b_dir)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}.{k} differs"
    assert scalars(a_dir) == scalars(b_dir)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    for k in ("test/loss", "test/acc", "test/f1", "best/val/acc", "best/epoch", "epochs", "global_step"):
        assert ma[k] == mb[k], k


@pytest.fixture(scope="module")
def straight(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_train(*args(tiny_root, run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_same_seed_same_run(tiny_root, straight, tmp_path):
    again = tmp_path / "again"
    assert run_train(*args(tiny_root, again)).returncode == 0
    assert_same_run(straight, again)


# Random steps (seeded, so a failure replays), mid-epoch ones and an epoch's last step among them; one more
# mid-epoch kill, with callbacks and trackers on, is tests/test_callbacks_and_trackers.py's.
KILL_STEPS = sorted(random.Random(2026).sample(range(4, STEPS), 2) + [16])


@pytest.mark.parametrize("step", KILL_STEPS)
def test_sigkill_at_any_step_then_resume_is_bitwise_exact(tiny_root, straight, tmp_path, step):
    killed = tmp_path / "killed"
    result = run_train_stopping(*args(tiny_root, killed), env={"STOP_AT_STEP": str(step),
                                                                "STOP_SIGNAL": str(int(signal.SIGKILL))})
    assert result.returncode == -signal.SIGKILL
    saved = final(killed)
    assert step - 3 <= saved["global_step"] < step  # the last checkpoint before the kill (just after the step)
    resumed = run_train(*args(tiny_root, tmp_path / "session2", f"trainer.resume={killed}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {saved['global_step']})" in resumed.stdout
    assert_same_run(straight, killed)  # the resumed run continued in the killed run's directory


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny_root, straight, tmp_path):
    killed = tmp_path / "killed"
    # the 5th checkpoint write is torn halfway: steps 3, 6, 9, 12 were written, 15 is being written
    result = run_train_stopping(*args(tiny_root, killed), env={"CHECKPOINT_WRITE": "5"})
    assert result.returncode == -signal.SIGKILL
    torn = list((killed / "checkpoints").glob(".last.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    assert final(killed)["global_step"] == 12  # the previous checkpoint, whole
    # hidden .tmp files of other programs in the same folder (a symlinked checkpoints/, an absolute
    # trainer.checkpoint_dir): resume removed them all; only the names atomic_write makes for last.pt and best.pt go
    foreign = [".notes.tmp", ".model.pt.abcdefgh.tmp", ".last.pt.tmp", ".best.pt.abcdefghi.tmp",
               ".xlast.pt.abcdefgh.tmp"]
    for name in foreign:
        (killed / "checkpoints" / name).write_text("not this run's")
    resumed = run_train(*args(tiny_root, tmp_path / "session2", f"trainer.resume={killed}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert not torn[0].exists()  # the torn file was cleared on resume
    assert sorted(p.name for p in (killed / "checkpoints").glob("*.tmp")) == sorted(foreign)
    assert_same_run(straight, killed)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_checkpoint_say_how_to_resume_and_resume_exactly(tiny_root, straight, tmp_path, sig, code):
    stopped = tmp_path / "stopped"
    result = run_train_stopping(*args(tiny_root, stopped), env={"STOP_AT_STEP": "20", "STOP_SIGNAL": str(int(sig))})
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert f"stopped by {sig.name} in epoch 2 at step 20" in result.stderr
    assert final(stopped)["global_step"] == 20 and final(stopped)["batch_in_epoch"] == 4  # this very step
    command = result.stderr.split("resume with: ")[1].strip()
    assert command.startswith("python train.py ") and f"trainer.resume={stopped}/checkpoints/last.pt" in command
    resumed = run_train(*[a for a in shlex.split(command)[2:] if not a.startswith("hydra.run.dir=")],
                        f"hydra.run.dir={tmp_path / 'session2'}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, stopped)


def test_sigkill_from_outside_at_a_random_moment(tiny_root, tmp_path):
    """A real kill -9 from another process at an unplanned moment, while checkpoints are written every step."""
    slow = ("trainer.max_epochs=6", "trainer.checkpoint_every_n_steps=1")
    reference = tmp_path / "reference"
    assert run_train(*args(tiny_root, reference, *slow)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args(tiny_root, killed, *slow)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    saved = final(killed)
    assert saved["global_step"] < 6 * 16
    resumed = run_train(*args(tiny_root, tmp_path / "session2", *slow, f"trainer.resume={killed}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, killed)


def test_resume_auto_continues_the_latest_unfinished_run_with_the_same_overrides(tiny_root, straight, tmp_path):
    out = tmp_path / "outputs"
    same = (*EXACT, f"dataset.root={tiny_root}", f"output_root={out}", "trainer.resume=auto")
    first = run_train_stopping(*same, env={"STOP_AT_STEP": "25", "STOP_SIGNAL": str(int(signal.SIGKILL))})
    assert first.returncode == -signal.SIGKILL
    (killed,) = [p.parent.parent for p in out.rglob("last.pt")]

    other = run_train(*same, "seed=1")  # other overrides: never continues that run
    assert other.returncode == 0 and "starting a new run" in other.stdout

    again = run_train(*same)
    assert again.returncode == 0, again.stderr
    assert f"continuing {killed}/checkpoints/last.pt" in again.stdout
    assert "at epoch 2, after batch 8 (step 24)" in again.stdout
    assert_same_run(straight, killed)

    finished = run_train(*same)  # that run is finished now: nothing to continue
    assert finished.returncode == 0 and "starting a new run" in finished.stdout
