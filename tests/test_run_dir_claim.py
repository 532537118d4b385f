"""Two runs given the same hydra.run.dir (or hydra.sweep.dir): exactly one claims it, the other stops at once.
Two processes that would train in one run directory (a resume of a live run, two resumes at once): one is refused."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MLP, REPO, TINY, run_train
from omegaconf import OmegaConf

from trainer.cli.hydra_callbacks import CLAIM_MARKER, RefuseExistingRunDir
from trainer.run.files import lock_run_dir

RACERS = 8
ROUNDS = 5  # fresh directories raced for in turn: the old check-then-create code lets two through in some round


def hydra_config(path: Path, output_subdir: str | None = ".hydra"):
    """The part of Hydra's config the callback reads, with `path` as both run and sweep directory."""
    return OmegaConf.create({"hydra": {"run": {"dir": str(path)}, "sweep": {"dir": str(path)},
                                       "output_subdir": output_subdir}})


def claim(path: Path, mode: str) -> None:
    """What the callback does for one run (`run`, `run_no_subdir`) or sweep (`sweep`) in `path`."""
    callback = RefuseExistingRunDir()
    if mode == "sweep":
        callback.on_multirun_start(hydra_config(path))
    else:
        callback.on_run_start(hydra_config(path, None if mode == "run_no_subdir" else ".hydra"))


def racer(barrier, path: Path, mode: str, stderr_file: Path) -> None:
    sys.stderr = open(stderr_file, "w", buffering=1)  # noqa: SIM115  (the process ends with it)
    barrier.wait()
    claim(path, mode)  # exits 1 when it loses; returning means exit code 0


@pytest.mark.parametrize(("mode", "claimed"), [("run", ".hydra"), ("run_no_subdir", CLAIM_MARKER),
                                              ("sweep", "multirun.yaml")])
def test_of_racing_processes_exactly_one_claims_the_dir(tmp_path, mode, claimed):
    key = "hydra.sweep.dir" if mode == "sweep" else "hydra.run.dir"
    ctx = multiprocessing.get_context("fork")  # fast start, so the racers meet at the barrier together
    for round_ in range(ROUNDS):
        path = tmp_path / f"round{round_}" / "run"
        barrier = ctx.Barrier(RACERS)
        logs = [tmp_path / f"round{round_}-{i}.err" for i in range(RACERS)]
        procs = [ctx.Process(target=racer, args=(barrier, path, mode, log)) for log in logs]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        codes = [p.exitcode for p in procs]
        assert sorted(codes) == [0] + [1] * (RACERS - 1), f"round {round_}: exit codes {codes}"
        for code, log in zip(codes, logs):
            lines = log.read_text().splitlines()
            if code == 0:
                assert lines == []
            else:
                assert len(lines) == 1 and lines[0].startswith(f"error: {key}={path}"), lines
        assert [p.name for p in path.iterdir()] == [claimed]  # the losers wrote nothing


def refused(path: Path, capsys, mode: str = "run") -> str:
    with pytest.raises(SystemExit) as exit_:
        claim(path, mode)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_non_empty_dir_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    assert "already exists and is not empty" in refused(tmp_path, capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_dir_claimed_by_another_run_is_refused(tmp_path, capsys):
    claim(tmp_path / "run", "run")
    assert f"hydra.run.dir={tmp_path / 'run'}" in refused(tmp_path / "run", capsys)
    claim(tmp_path / "sweep", "sweep")
    assert f"hydra.sweep.dir={tmp_path / 'sweep'}" in refused(tmp_path / "sweep", capsys, "sweep")


@pytest.mark.parametrize(("mode", "claimed"), [("run", ".hydra"), ("run_no_subdir", CLAIM_MARKER),
                                              ("sweep", "multirun.yaml")])
def test_empty_pre_existing_dir_is_accepted(tmp_path, mode, claimed):
    claim(tmp_path, mode)  # tmp_path exists and is empty, as a directory a user made
    assert [p.name for p in tmp_path.iterdir()] == [claimed]


def test_sweep_claim_holds_the_sweep_config(tmp_path):
    claim(tmp_path / "sweep", "sweep")  # what Hydra's basic sweeper writes there too; Optuna's writes none
    assert yaml.safe_load((tmp_path / "sweep" / "multirun.yaml").read_text())["hydra"]["sweep"]["dir"] == \
        str(tmp_path / "sweep")


def test_nested_output_subdir_is_claimed(tmp_path):
    OmegaConf.update(config := hydra_config(tmp_path / "run"), "hydra.output_subdir", "meta/.hydra")
    RefuseExistingRunDir().on_run_start(config)
    assert (tmp_path / "run" / "meta" / ".hydra").is_dir()


def test_unwritable_location_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert "cannot write there" in refused(tmp_path / "a_file" / "run", capsys)


def test_two_train_runs_in_one_dir_one_trains_the_other_stops(tiny_root, tmp_path):
    run_dir = tmp_path / "same"
    procs = {}
    for seed in (1, 2):  # both started before either is waited for
        with open(tmp_path / f"seed{seed}.out", "w") as out, open(tmp_path / f"seed{seed}.err", "w") as err:
            procs[seed] = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY,
                                            f"dataset.root={tiny_root}", f"hydra.run.dir={run_dir}",
                                            "model=logistic", "trainer.max_epochs=1", f"seed={seed}"],
                                           cwd=REPO, stdout=out, stderr=err)  # the child keeps its own copies
    results = {seed: (p.wait(600), (tmp_path / f"seed{seed}.err").read_text()) for seed, p in procs.items()}
    (winner,) = [seed for seed, (code, _) in results.items() if code == 0]
    (loser,) = [seed for seed, (code, _) in results.items() if code != 0]
    code, stderr = results[loser]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "hydra.run.dir" in lines[0] and "Traceback" not in stderr, stderr
    assert len(list(run_dir.rglob("events.out.tfevents*"))) == 1
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["seed"] == winner


# --- a run directory is trained in by one process at a time (trainer.run.files.lock_run_dir) ----------------


@pytest.fixture
def one_epoch_run(tiny_root, tmp_path):
    run = tmp_path / "run"
    result = run_train(*TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={run}", *MLP, "scheduler=step",
                       "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr
    return run


def resume(tiny_root, run, i, epochs):
    return [sys.executable, str(REPO / "train.py"), *TINY, f"dataset.root={tiny_root}", *MLP,
            "scheduler=step", f"trainer.max_epochs={epochs}", f"trainer.resume={run}/checkpoints/last.pt",
            f"hydra.run.dir={run.parent}/invocation{i}"]


def test_resuming_a_run_that_another_process_trains_in_is_refused(tiny_root, one_epoch_run):
    before = (one_epoch_run / "checkpoints" / "last.pt").read_bytes()
    held = lock_run_dir(one_epoch_run)  # as the run's own process holds it while it trains (this is another process)
    refused = subprocess.run(resume(tiny_root, one_epoch_run, 1, 2), cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert lines[0] == f"error: {one_epoch_run} is in use by another process training in it (a run still going, " \
                       "or another resume of it); wait for it to end, or stop it first"
    assert (one_epoch_run / "checkpoints" / "last.pt").read_bytes() == before
    held.close()  # the holder ends: now the resume goes through
    assert subprocess.run(resume(tiny_root, one_epoch_run, 2, 2), cwd=REPO, capture_output=True,
                          timeout=600).returncode == 0


def test_two_resumes_of_one_run_at_once_one_trains_the_other_is_refused(tiny_root, one_epoch_run, tmp_path):
    procs = [subprocess.Popen(resume(tiny_root, one_epoch_run, i, 40), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # both started, then waited for
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    (stderr,) = [err for code, err in results if code == 1]
    assert "is in use by another process training in it" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    state = torch.load(one_epoch_run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (40, 40 * 16)  # one run's steps, not two runs' interleaved


# --- a checkpoint directory outside the run directory (an absolute trainer.checkpoint_dir) -------------------


def shared_ckpt_run(tiny_root, tmp_path, name, ckpt_dir):
    return run_train(*TINY, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / name}", *MLP, "scheduler=none",
                     "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_eval_batches=1",
                     f"trainer.checkpoint_dir={ckpt_dir}")


def test_a_checkpoint_dir_holding_another_runs_checkpoints_is_refused(tiny_root, tmp_path):
    shared = tmp_path / "shared_checkpoints"
    first = shared_ckpt_run(tiny_root, tmp_path, "first", shared)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in shared.glob("*.pt")}
    assert set(before) == {"best.pt", "last.pt"}
    second = shared_ckpt_run(tiny_root, tmp_path, "second", shared)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: trainer.checkpoint_dir={shared}: it holds another run's checkpoints (last.pt, best.pt), which this "
        "run would overwrite; give each run its own directory (a relative one is inside the run directory), or "
        f"continue that run with trainer.resume={shared / 'last.pt'}"]
    assert {p.name: p.read_bytes() for p in shared.glob("*.pt")} == before  # the first run's, untouched


def test_a_checkpoint_dir_another_live_run_writes_in_is_refused(tiny_root, tmp_path):
    shared = tmp_path / "shared_checkpoints"
    held = lock_run_dir(shared)  # as a run training with this checkpoint_dir holds it (this is another process)
    try:
        result = shared_ckpt_run(tiny_root, tmp_path, "second", shared)
    finally:
        held.close()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {shared} is in use by another run writing its checkpoints there (the same "
        "trainer.checkpoint_dir); give each run its own"]
    assert not list(shared.glob("*.pt"))


def test_a_run_dir_that_cannot_be_written_is_named_in_one_line(tmp_path, monkeypatch):
    # a resume into a run directory on a read-only file system: OSError 30 with no path, before
    import errno
    import os

    from trainer.errors import OutputError

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError) as e:
        lock_run_dir(tmp_path)
    assert str(e.value) == f"cannot lock {tmp_path} for this run: Read-only file system ({tmp_path / '.lock'})"
