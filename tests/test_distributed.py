"""`torchrun --nproc_per_node=2 train.py ...` on CPU (gloo), end to end on a tiny dataset: one run directory,
metrics over the full validation and test sets, the same result as one process with the same effective
batch, checkpoints that move between DDP and single-process runs, and clean errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _STOPPING_TRAIN, REPO, TINY, run_train

# each torchrun start costs ~10 s of imports per process; pytest-xdist: the module-scoped runs stay in one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

# A faint patch, so accuracy after 3 epochs is informative (not 1.0). 480 training images: 15 global batches of
# 32 with no remainder, so two processes of 16 see exactly the batches one process of 32 sees. Evaluation
# batches of 64 leave the second rank a short last batch (val 120 = 64 + 56, test 200 = 128 + 64 + 8).
COMMON = (*TINY, "dataset.val_size=120", "dataset.eval_batch_size=64", "model=mlp", "scheduler=cosine",
          "trainer.max_epochs=3", "trainer.deterministic=true")
DDP = "dataset.batch_size=16"  # per process: 2 x 16 = the single process's 32
# What DDP gives is equality up to float rounding, not bit for bit: each rank's gradient is the mean over its 16
# samples and the all-reduce averages the two, where one process takes the mean over 32 at once, so the sums run
# in another order. Adam then turns a rounding-sized difference in a near-zero gradient into a step of up to lr.
# Over 45 steps the largest difference of any weight stays below this (measured: see docs/distributed.md).
DDP_MAX_DIFF = 2e-3


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    """The largest absolute difference of each tensor of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def torchrun(*overrides, nproc=2, timeout=300, wrapper=(), env=None):
    """`torchrun --standalone --nproc_per_node=N train.py OVERRIDES`, as a user would type it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *wrapper, "train.py", *overrides]  # the script as the user types it, from the root
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def runs_under(root):
    return sorted(p.parent for p in root.rglob(".hydra"))


@pytest.fixture(scope="module")
def ddp(faint_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_out")
    # with a torchmetrics metric, which syncs the ranks itself (the built-in ones are all-reduced counts), trackers
    # (rank 0's only) and a callback (on every rank; rank 0 writes)
    result = torchrun(*COMMON, DDP, "metrics=[cohen_kappa]", "logger=[tensorboard,csv,mlflow]",
                      "callbacks=[keep_checkpoints]", f"dataset.root={faint_root}", f"output_root={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def single(faint_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = run_train(*COMMON, "dataset.batch_size=32", f"dataset.root={faint_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_one_run_directory_written_by_rank_0_only(ddp):
    out, result = ddp
    (run,) = runs_under(out)  # exactly one, with one .hydra
    mlflow_files = {out / "mlartifacts", *(p for p in (out / "mlartifacts").rglob("*") if p.is_dir())}
    assert {p for p in out.rglob("*") if p.is_dir()} - mlflow_files == {run.parent, run, run / ".hydra",
                                                                        run / "checkpoints"}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "epoch_001.pt", "epoch_002.pt",
                                                                       "epoch_003.pt", "last.pt"]
    steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["5", "10", "15", "20", "25", "30", "35", "40", "45"]  # rank 0's rows, once each
    from test_mlflow import runs, store

    (logged,) = runs(store(out))  # one MLflow run for the two processes
    assert logged.info.status == "FINISHED" and logged.data.metrics["test/acc"] > 0
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    assert result.stdout.count("epoch 3/3") == 1 and result.stdout.count("test  test/loss") == 1  # rank 0's console
    assert "2 processes (gloo)" in result.stdout and "not scaled" in result.stdout


def test_a_submitit_job_of_two_tasks_is_the_same_ddp_job(ddp, faint_root, tmp_path):
    # Hydra's submitit launcher, through submitit's local executor (what hydra/launcher=slurm does on a
    # cluster): one job of two tasks, each a DDP rank, must train exactly as torchrun's two processes did.
    result = run_train("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                       "hydra.launcher.timeout_min=10", *COMMON, DDP, f"dataset.root={faint_root}",
                       f"output_root={tmp_path}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = runs_under(tmp_path)  # one job directory for the two tasks
    assert len(list(job.glob("events.out.tfevents.*"))) == 1
    assert json.loads((job / "metrics.json").read_text())["world_size"] == 2
    (torchrun_run,) = runs_under(ddp[0])
    a = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(torchrun_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_the_slurm_launcher_config_composes():
    result = run_train("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout


def test_checkpoint_has_plain_keys_and_the_single_process_result(ddp, single):
    (run,) = runs_under(ddp[0])
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    assert a["world_size"] == 2 and a["global_step"] == b["global_step"] == 45
    assert a["model"].keys() == b["model"].keys() and not any(k.startswith("module.") for k in a["model"])
    # Two ranks of 16 average to the gradient of the same 32 samples: the same training up to float rounding
    diffs = max_diffs(a["model"], b["model"])
    print("DDP vs one process, max |diff| per tensor:", diffs)
    assert all(d <= DDP_MAX_DIFF for d in diffs.values()), diffs
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run, single))
    assert 0.3 < mb["test/acc"] < 0.99  # informative: neither chance nor saturated
    assert ma["test/acc"] == pytest.approx(mb["test/acc"], abs=0.02)  # measured: equal
    assert ma["test/loss"] == pytest.approx(mb["test/loss"], abs=1e-3)
    assert ma["best/val/acc"] == pytest.approx(mb["best/val/acc"], abs=0.02)


@pytest.mark.parametrize("split", ["test", "val"])
def test_metrics_are_over_the_full_split_not_one_shard(ddp, faint_root, split, tmp_path):
    (run,) = runs_under(ddp[0])
    kappa = ["metrics=[cohen_kappa]"] if split == "test" else []  # the test's: compared with the run's below
    result = run_train(f"ckpt={run}/checkpoints/best.pt", f"split={split}", f"data_root={faint_root}", *kappa,
                       f"hydra.run.dir={tmp_path}/eval", script="eval.py")
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    if split == "test":  # every test metric, the per-class ones, AUROC's histograms and ECE's bins included
        measured = [k for k in trained if k.startswith("test/")]
        assert len(measured) == 8 + 4 * 10  # 7 built in and cohen_kappa; per class precision, recall, F1, AUROC
        assert {"test/auroc", "test/ece", "test/acc_top5", "test/cohen_kappa"} <= set(measured)
        for k in measured:
            assert trained[k] == pytest.approx(alone[k], abs=1e-5, nan_ok=True), k
    else:
        assert trained["best/val/acc"] == pytest.approx(alone["val/acc"], abs=1e-6)


def test_a_ddp_run_stopped_mid_epoch_resumes_exactly(ddp, faint_root, tmp_path):
    wrapper = tmp_path / "stopping.py"
    wrapper.write_text(_STOPPING_TRAIN)
    out = tmp_path / "out"
    # Rank 1 alone gets SIGTERM after step 18 (epoch 2 of 15-step epochs); the ranks agree to stop at the
    # next log point (every 5 steps in TINY), step 20, and checkpoint there.
    stopped = torchrun(*COMMON, DDP, f"dataset.root={faint_root}", f"output_root={out}", wrapper=(str(wrapper),),
                       env={"STOP_AT_STEP": "18", "STOP_SIGNAL": "15", "STOP_RANK": "1"})
    assert stopped.returncode != 0 and "stopped by SIGTERM in epoch 2 at step 20" in stopped.stderr
    assert "resume with: torchrun --nproc_per_node=2 train.py" in stopped.stderr
    (run,) = runs_under(out)
    last = run / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["batch_in_epoch"] == 5
    refused = run_train(*COMMON, "dataset.batch_size=32", f"dataset.root={faint_root}", f"trainer.resume={last}")
    assert refused.returncode == 1 and "stopped mid-epoch in a run of 2 process(es); resume it with 2, not 1" in \
        refused.stderr
    resumed = torchrun(*COMMON, DDP, f"dataset.root={faint_root}", f"trainer.resume={last}",
                       f"output_root={tmp_path / 'resuming'}")  # the resuming process's own train.log goes there
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert runs_under(out) == [run]
    (straight,) = runs_under(ddp[0])
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 45
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    for k in ("test/loss", "test/acc", "test/f1", "test/balanced_acc", "test/acc_top5", "test/auroc", "test/ece",
              "best/val/acc", "best/epoch"):
        assert ma[k] == mb[k], k


@pytest.mark.parametrize("sampling", [("dataset.sampler=balanced",), (f"dataset.memory_budget_gib={300 * 2**-20}",)],
                         ids=["balanced", "beyond memory"])
def test_balanced_or_streamed_class_weighted_folds_under_two_processes_match_one(faint_root, tmp_path, sampling):
    """Every rank draws the same balanced sample, or reads the same windows of data over the memory budget (its
    slice of each), weighs the classes alike and validates on the same fold: two processes of 16 train as one of
    32 does, up to DDP's rounding."""
    # drop_last: one process keeps the 2 images past the 14 global batches, which two processes drop
    extra = (*sampling, "loss.class_weights=auto", "dataset.folds=4", "dataset.fold=2",
             "dataset.drop_last=true", f"dataset.root={faint_root}")
    two = torchrun(*COMMON, DDP, *extra, f"output_root={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_train(*COMMON, "dataset.batch_size=32", *extra, f"output_root={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(next((tmp_path / d).rglob("last.pt")), weights_only=True) for d in ("two", "one"))
    assert a["class_weights"] == b["class_weights"] and a["data"]["fold"] == b["data"]["fold"] == [2, 4, 0]
    assert a["global_step"] == b["global_step"] == 3 * 14  # 450 training images: 14 full global batches of 32
    diffs = max_diffs(a["model"], b["model"])
    assert all(d <= DDP_MAX_DIFF for d in diffs.values()), diffs


# Last: it continues both runs (their metrics.json is rewritten).
def test_ddp_checkpoint_resumes_in_one_process_and_back(ddp, single, faint_root, tmp_path):
    (run,) = runs_under(ddp[0])
    # output_root: the resuming processes' own directories (their train.log) go there, not into the repo's outputs/
    more = ("trainer.max_epochs=4", f"dataset.root={faint_root}", f"output_root={tmp_path}")
    one = run_train(*COMMON, "dataset.batch_size=32", *more, f"trainer.resume={run}/checkpoints/last.pt")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "epoch 4/4" in one.stdout and json.loads((run / "metrics.json").read_text())["world_size"] == 1
    two = torchrun(*COMMON, DDP, *more, f"trainer.resume={single}/checkpoints/last.pt")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("epoch 4/4") == 1
    assert json.loads((single / "metrics.json").read_text())["world_size"] == 2
    # Each went on from its own state with the other's layout: 3 epochs of DDP then 1 alone, and 3 alone then 1
    # of DDP. Both are the same 60 steps of the same training, so their weights agree as DDP and one process do.
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (run, single))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (4, 60)
    diffs = max_diffs(a["model"], b["model"])
    print("DDP 3 + one 1 vs one 3 + DDP 1, max |diff| per tensor:", diffs)
    assert all(d <= DDP_MAX_DIFF for d in diffs.values()), diffs


def test_every_rank_evaluates_the_same_ema_of_a_batch_norm_model(faint_root, tmp_path):
    # DDP syncs batch-norm buffers only as a forward starts, so each rank's EMA of them drifts from rank 0's
    # between syncs; without the Trainer's broadcast before each evaluation this measured 3.6e-4 at epoch 1.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_ema_probe.py"), str(tmp_path / "run"), *COMMON, DDP, f"dataset.root={faint_root}",
           "model=cnn", "model.channels=[4,8]", "model.hidden=16", "trainer.ema_decay=0.9", "trainer.log_graph=false"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])["ema_max_diff_per_evaluation"]
    assert diffs == [0.0] * 4  # 3 validations and the test
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and int(ckpt["ema_updates"]) == 45
    assert ckpt["model"].keys() == ckpt["train_model"].keys()


def test_too_few_samples_for_the_processes_is_a_clean_error(faint_root, tmp_path):
    result = torchrun(*COMMON, "dataset.batch_size=256", f"dataset.root={faint_root}", f"output_root={tmp_path}")
    assert result.returncode != 0
    assert "error: 480 training samples do not fill one batch of 256 for each of 2 processes" in result.stderr
    # The only traceback is torchrun's own report that a worker failed; the workers print just the error line.
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr


# train.py, except that rank DIE_RANK stops answering for 15 s after optimizer step DIE_AT_STEP
_HANGING = """
import os, runpy, sys, time
from trainer.loop.trainer import Trainer
train_py, sys.argv[0] = sys.argv[1], sys.argv[1]
del sys.argv[1]
at, step = int(os.environ["DIE_AT_STEP"]), Trainer._optimizer_step
def stepping(self):
    used = step(self)
    if self.progress.global_step == at and os.environ["RANK"] == os.environ["DIE_RANK"]:
        time.sleep(15)
    return used
Trainer._optimizer_step = stepping
runpy.run_path(train_py, run_name="__main__")
"""


def test_a_rank_that_stops_answering_ends_the_job_after_the_timeout(faint_root, tmp_path):
    wrapper = tmp_path / "hanging.py"
    wrapper.write_text(_HANGING)
    start = time.monotonic()
    result = torchrun(*COMMON, DDP, f"dataset.root={faint_root}", f"output_root={tmp_path}/out",
                      "distributed.timeout_s=3", wrapper=(str(wrapper),), env={"DIE_AT_STEP": "2", "DIE_RANK": "1"},
                      timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 100
    assert "error: rank 0 of 2: lost another process of the job (Timed out" in result.stdout + result.stderr
    assert "distributed.timeout_s=3s" in result.stderr


def test_a_killed_rank_ends_the_job_at_once_and_keeps_the_checkpoints(faint_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *COMMON, DDP, "trainer.max_epochs=1000", f"dataset.root={faint_root}", f"output_root={out}"]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("last.pt")):  # training is under way, a checkpoint written
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        rank_1 = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and rank_of(p) == "1"
                      and str(out) in (p / "cmdline").read_text(errors="replace"))
        os.kill(rank_1, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0 and time.monotonic() - killed < 30  # the other rank did not wait for the timeout
    assert "exitcode  : -9" in stderr  # torchrun names the killed rank as the root cause
    (run,) = runs_under(out)
    # the last epoch's, whole (a write cut short leaves only a temporary file, which a resume deletes)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] >= 1


def rank_of(proc: Path) -> str | None:
    try:
        env = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def test_two_processes_on_real_mnist_reach_the_single_process_accuracy(real_root, tmp_path):
    # The one-epoch MLP of docs/performance.md (97.19%, floor 0.97), with its batch of 128 split over two processes.
    common = ("model=mlp", "trainer.max_epochs=1", "trainer.device=cpu", f"dataset.root={real_root}")
    result = torchrun(*common, "dataset.batch_size=64", f"output_root={tmp_path}/ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_train(*common, f"hydra.run.dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-3000:]
    (run,) = runs_under(tmp_path / "ddp")
    ddp_acc, one_acc = (json.loads((d / "metrics.json").read_text())["test/acc"] for d in (run, tmp_path / "single"))
    print(f"MNIST MLP, 1 epoch: test/acc {ddp_acc:.4f} with 2 processes, {one_acc:.4f} with one")
    assert ddp_acc >= 0.97 and ddp_acc == pytest.approx(one_acc, abs=0.005)
