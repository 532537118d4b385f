"""Shared fixtures: tiny generated IDX datasets, real data (via ../shared as a mirror when present),
and a helper that runs train.py as a user would."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.cli.paths import prepare_hydra
from trainer.data.idx import write_idx
from trainer.data.provision import provision

prepare_hydra()  # the tests compose configs (${root_dir:}) as the entry points do

# Under pytest-xdist, one worker per core already fills the machine: a torch process with a thread per core on
# top (the worker's own, and every train.py it starts) leaves OpenMP threads spinning against each other. Measured
# on 2 cores, 2 workers, the resume and signal tests: 2 m 27 s with one thread each, 2 m 59 s with the default.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every process a test starts
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


# torch's deterministic mode as this process began (each xdist worker imports this file first)
WORKER_DETERMINISM = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.fixture(autouse=True)
def _deterministic_mode_of_its_own():
    """Each test starts, and leaves, torch's deterministic mode as the worker began. A Trainer built in-process with
    trainer.deterministic=true turns it on for the process; left on, it sent a later test's torchmetrics reference
    down its deterministic bincount (a one-hot of 1000x1000 bins): 171 s instead of 0.15 s, in CI. Set before the
    test too: a module-scoped fixture (test_resume_variants' runs) turns it on before any test's own fixtures."""
    deterministic, warn_only = WORKER_DETERMINISM
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def pytest_addoption(parser):
    parser.addoption("--full-grid", action="store_true",
                     help="tests/test_compose.py: train all 576 option combinations, not the 48 pairwise rows")


# Modules whose tests share module- or session-scoped state or run in order (`pytestmark = ...xdist_group(...)`):
# the README's commands in one copy of the repository, torchrun runs, the resume variants, the installed wheel.
GROUPED_MODULES = {p.name for p in Path(__file__).parent.glob("test_*.py") if "xdist_group(" in p.read_text()}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`, with each GROUPED_MODULES module one unit of work for one worker. pytest-xdist 3.8's own
    loadgroup marks the groups on the workers (an `@group` suffix of each test id) but the ids reach the scheduler
    without it, so a group was spread over the workers like any test: the README's summarize.py line ran in a
    worker whose copy had no runs yet. Measured: 12 tests of one group went 6 to each of 2 workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in GROUPED_MODULES else nodeid

    return ModuleGroups(config, log)
SHARED_MIRROR = REPO.parent / "shared" / "data"  # developers' and CI's local copy; optional


def make_tiny_dataset(root: Path, name: str = "MNIST", n_train: int = 600, n_test: int = 200, seed: int = 0,
                      patch: int = 255) -> Path:
    """Write a small learnable MNIST-layout dataset: class k is a 6x6 patch at a k-dependent spot + noise.

    The patch adds `patch` to the 0..59 noise. At 255 it is saturated and one epoch learns it all; a faint one
    (12) leaves accuracy after an epoch well below 1 and dependent on the hyperparameters."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for k in range(10):
            r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
            images[labels == k, r:r + 6, c:c + 6] += patch
        return images.clamp(max=255).to(torch.uint8), labels.to(torch.uint8)

    raw = root / name / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = split(n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    make_tiny_dataset(root, "MNIST")
    make_tiny_dataset(root, "FashionMNIST", seed=1)
    return root


@pytest.fixture(scope="session")
def faint_root(tmp_path_factory) -> Path:
    """Faint patches: a short run leaves accuracy below 1 and dependent on the model and hyperparameters."""
    root = tmp_path_factory.mktemp("faint_data")
    make_tiny_dataset(root, "MNIST", patch=12)
    make_tiny_dataset(root, "FashionMNIST", seed=1, patch=12)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The repo's data/ directory with both real datasets, provisioned the way train.py does it."""
    root = REPO / "data"
    mirror = SHARED_MIRROR if SHARED_MIRROR.is_dir() else None
    root.mkdir(exist_ok=True)
    with open(root / ".provision.lock", "ab") as lock:  # pytest-xdist workers: one provisions, the others wait
        fcntl.lockf(lock, fcntl.LOCK_EX)
        for name in ("MNIST", "FashionMNIST"):
            provision(name, root, download=True, mirror=mirror)
    return root


CNN_EPOCH = ("model=cnn", "optimizer=adam", "trainer.max_epochs=1")  # the defaults' first epoch, on real MNIST


@pytest.fixture(scope="session")
def real_cnn_epoch(real_root, tmp_path_factory) -> Path:
    """The run directory of one epoch of the default CNN (Adam, one-cycle) on real MNIST, trained once for the whole
    suite: test_real_data checks its accuracy floor, test_predict reads digits with its best.pt. The xdist workers
    share it through a lock in their common directory (30 s of training, once)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, not an earlier one's
    run_dir = shared / "real_cnn_epoch"
    with open(shared / "real_cnn_epoch.lock", "ab") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        if not (run_dir / "metrics.json").is_file():
            result = run_train(*CNN_EPOCH, f"dataset.root={real_root}", f"hydra.run.dir={run_dir}")
            assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


TINY = ("dataset.verify=false", "dataset.val_size=100", "dataset.batch_size=32", "dataset.eval_batch_size=100",
        "trainer.log_every_n_steps=5", "trainer.device=cpu")
# An MLP of one 64-unit layer: the same code paths as the default 512/256, a twelfth of the weights (0.6 MB
# checkpoints instead of 6.4 MB, written and fsynced hundreds of times by the resume tests).
MLP = ("model=mlp", "model.hidden_sizes=[64]")


def run_train(*overrides: str, timeout: float = 600, env: dict[str, str] | None = None,
              script: str = "train.py") -> subprocess.CompletedProcess:
    """Run `python train.py OVERRIDES...` (or another script) from the repo root, as a user would: the script's
    path as the README spells it, relative to the root (the command spells itself back so: `resume with: ...`)."""
    return run_python([script, *overrides], env={**os.environ, **(env or {})}, timeout=timeout,
                      forkable=script in FORKABLE_SCRIPTS)


def train_in_process(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """What `python train.py OVERRIDES...` answers, computed in this process through the library: the config
    composed as @hydra.main composes it, trainer.cli.train.train() run in the run directory Hydra would make, and
    the one line its main() prints for a failure (the status is 1 then, as the command's). An error of the
    code's own is raised, not answered. For what only a process shows (the exit path, signals, Hydra's
    run-directory callbacks, the console's single line), use run_train."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from trainer.cli import train as command
    from trainer.cli.config_errors import config_error_line

    answer = functools.partial(subprocess.CompletedProcess, ["train.py", *overrides])
    saved = dict(os.environ)
    # what a run sets for its process, put back after it: the RNGs (train seeds them), threads, determinism
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.environ.update(env or {})
    try:
        try:
            with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
                cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            return answer(1, "", f"error: {config_error_line(e)}\n")
        run_dir = Path(cfg.hydra.run.dir)
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.runtime.output_dir = RunMode.RUN, str(run_dir)
        HydraConfig.instance().set_config(cfg)
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what the task function gets
        run_dir.mkdir(parents=True, exist_ok=True)  # as Hydra's run_job does
        try:
            command.train(job, run_dir)
            return answer(0, "", "")
        except (command.UserError, command.NonFiniteLossError, OmegaConfBaseException, RuntimeError) as e:
            line = command.failure_line(e, job.distributed.timeout_s)
            if line is None:
                raise
            return answer(1, "", line + "\n")
    finally:
        HydraConfig.instance().cfg = None
        os.environ.clear()
        os.environ.update(saved)
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


# Scripts that preload mimalloc as their first step, as the fork server's children already run under it.
FORKABLE_SCRIPTS = ("train.py", "eval.py", "scripts/predict.py", "scripts/export.py")
# Variables read as a process starts or imports torch (the loader, the allocator, thread pools, Python itself):
# a run whose environment differs from the fork server's in one of them gets a fresh process.
STARTUP_ENV = ("LD_", "TRAINER_ALLOCATOR", "_TRAINER_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_",
               "PYTHON", "TORCH", "HYDRA_")


class ForkServer:
    """Client of tests/forkserver.py: `python ARGV...` as a child forked from a process with the imports done."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py")], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env)
        self.lock = threading.Lock()
        assert self._answer(120) == "ready"

    def _answer(self, timeout: float) -> str | None:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        return self.proc.stdout.readline().decode().strip()

    def serves(self, env: dict[str, str]) -> bool:
        keys = {k for k in set(env) | set(self.env) if k.startswith(STARTUP_ENV)}
        return self.proc.poll() is None and all(env.get(k) == self.env.get(k) for k in keys)

    def run(self, argv: list[str], env: dict[str, str], timeout: float, tmp: Path) -> subprocess.CompletedProcess:
        out, err = tmp / "stdout", tmp / "stderr"
        request = {"argv": argv, "cwd": str(REPO), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        pid = int(self._answer(60))
        status = self._answer(timeout)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            self._answer(60)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *argv], os.waitstatus_to_exitcode(int(status)),
                                           out.read_text(), err.read_text())


_fork_server: ForkServer | None = None


def run_python(argv: list[str], env: dict[str, str], timeout: float, forkable: bool) -> subprocess.CompletedProcess:
    """`python ARGV...` from the repo root with output captured: forked from the fork server when it can run
    this exactly as a fresh process would (see tests/forkserver.py), else a fresh process."""
    global _fork_server
    if forkable and os.environ.get("FORKSERVER", "1") != "0":
        if _fork_server is None or _fork_server.proc.poll() is not None:
            _fork_server = ForkServer()
        if _fork_server.serves(env) and _fork_server.lock.acquire(blocking=False):  # busy: another thread's run
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    return _fork_server.run(argv, env, timeout, Path(tmp))
            finally:
                _fork_server.lock.release()
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


# train.py, except that the process (under torchrun: only rank STOP_RANK, if set) sends itself a signal right
# after optimizer step STOP_AT_STEP, or as the phase SIGNAL_DURING starts, fills its disk after step
# FILL_DISK_AT_STEP, or is
# SIGKILLed halfway through writing its CHECKPOINT_WRITE-th checkpoint file (a torn temporary file is left).
# TRUST_CIFAR_MD5 makes torchvision's CIFAR loader accept generated files (its own loading code still runs).
_STOPPING_TRAIN = """
import io, os, runpy, signal, sys
import torch
from trainer.loop.trainer import Trainer
train_py, sys.argv[0] = sys.argv[1], sys.argv[1]
del sys.argv[1]
if "STOP_AT_STEP" in os.environ:
    at, sig, step = int(os.environ["STOP_AT_STEP"]), int(os.environ["STOP_SIGNAL"]), Trainer._optimizer_step
    def stepping(self):
        lr = step(self)
        rank = os.environ.get("RANK")
        if self.progress.global_step == at and os.environ.get("STOP_RANK", rank) == rank:
            os.kill(os.getpid(), sig)
        return lr
    Trainer._optimizer_step = stepping
if "FILL_DISK_AT_STEP" in os.environ:  # after that optimizer step, a file fills the run directory's disk
    fill_at, unfilled_step = int(os.environ["FILL_DISK_AT_STEP"]), Trainer._optimizer_step
    def filling(self):
        used = unfilled_step(self)
        if self.progress.global_step == fill_at:
            fd = os.open(self.run_dir / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, bytes(1 << 16)):
                    pass
            except OSError:  # ENOSPC: the disk is full
                pass
            os.close(fd)
        return used
    Trainer._optimizer_step = filling
if "SIGNAL_DURING" in os.environ:  # val, test, log_graph, log_hparams or metrics_json: a signal as it starts
    import trainer.report.logger, trainer.report.run_report
    phase, sig = os.environ["SIGNAL_DURING"], int(os.environ["STOP_SIGNAL"])
    def signalling(fn, when=lambda *args: True):
        def wrapped(*args, **kwargs):
            if when(*args):
                os.kill(os.getpid(), sig)
            return fn(*args, **kwargs)
        return wrapped
    if phase in ("val", "test"):
        Trainer.evaluate = signalling(Trainer.evaluate, lambda self, loader, prefix: prefix == phase)
    elif phase == "metrics_json":  # the report's only atomic_write is metrics.json (checkpoints have their own)
        trainer.report.run_report.atomic_write = signalling(trainer.report.run_report.atomic_write)
    else:
        logger_class = trainer.report.logger.TensorBoardLogger
        setattr(logger_class, phase, signalling(getattr(logger_class, phase)))
if "CHECKPOINT_WRITE" in os.environ:
    nth, save, calls = int(os.environ["CHECKPOINT_WRITE"]), torch.save, []
    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < nth:
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
if os.environ.get("TRUST_CIFAR_MD5"):  # generated CIFAR files cannot have the official MD5s
    import torchvision.datasets.cifar as cifar
    cifar.CIFAR10._check_integrity = lambda self: True
    cifar.check_integrity = lambda *args, **kwargs: True
runpy.run_path(train_py, run_name="__main__")
"""


def run_train_stopping(*overrides: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`run_train`, with the process stopping itself as `env` says (see _STOPPING_TRAIN)."""
    return run_python(["-c", _STOPPING_TRAIN, "train.py", *overrides], env={**os.environ, **env},
                      timeout=timeout, forkable=True)
