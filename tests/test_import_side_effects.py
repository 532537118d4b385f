"""Importing the library changes no process state, so a notebook or a user's own script can use it without the
command line's process-level behaviour. Those changes belong to the entry points (train.py and the scripts):
- the allocator's re-exec and its memory cap;
- the fast exit;
- the one-line config errors;
- quieting TensorBoard's writer thread.

Each check runs in a fresh interpreter that imports every module of the package.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PROBE = r"""
import importlib, logging, os, pkgutil, resource, signal, sys, threading

umask_calls = []
real_umask = os.umask
os.umask = lambda mask: umask_calls.append(mask) or real_umask(mask)
import hydra._internal.utils as hydra_utils
import torch
from omegaconf import OmegaConf

def state():
    return {
        "environment": dict(os.environ),
        "sys.excepthook": sys.excepthook,
        "threading.excepthook": threading.excepthook,
        "signal handlers": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
        "argv": list(sys.argv),
        "working directory": os.getcwd(),
        "hydra's run_and_report": hydra_utils.run_and_report,
        "logging handlers": list(logging.root.handlers),
        "logging.raiseExceptions": logging.raiseExceptions,
        "data size limit": resource.getrlimit(resource.RLIMIT_DATA),
        "torch threads": torch.get_num_threads(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "OmegaConf resolvers": OmegaConf.has_resolver("root_dir"),
    }

before = state()
import trainer
names = [m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer.")]
for name in names:
    importlib.import_module(name)
after = state()
changed = [key for key in before if before[key] != after[key]]
assert not changed, f"importing the package changed: {changed}"
assert not umask_calls, f"importing the package set the umask: {umask_calls}"
print(len(names), "modules")
"""


def test_importing_every_module_of_the_package_changes_no_process_state():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[0]) >= 30, done.stdout  # it did import the package's modules


def test_training_never_imports_matplotlib_torchmetrics_or_mlflow():
    """The LR finder's plot is matplotlib's; torchmetrics and MLflow come only with a run that picks them
    (metrics=[...], logger=mlflow): a training run's modules, the loop, the report and the trackers must not pay
    their import on start-up (2.3 s and 230 MiB for torchmetrics alone)."""
    probe = ("import sys, trainer.cli.train, trainer.loop.trainer, trainer.report.run_report, "
             "trainer.report.csv_logger, trainer.loop.keep_checkpoints; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torchmetrics', 'mlflow'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])
