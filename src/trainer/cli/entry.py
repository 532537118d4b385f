"""The command-line edge: what each installed command (`htt-train`, ...) and each checkout script does to its
process before the command runs. Nothing here runs when the library is imported.

- mimalloc is preloaded by re-executing the process once, before torch is imported (trainer/cli/allocator.py);
- the current folder is put on the import path, after the installed packages, so that a `_target_` names a
  user's own module (`mynet.TinyNet`) with no PYTHONPATH, and a file there can never replace an installed
  package such as torch or trainer;
- a log line a full disk drops is not printed with a traceback;
- Hydra's config errors are made one line (trainer/errors.py), and the process ends without the interpreter's
  slow teardown of torch (trainer/cli/process.py).

Each function here is light to import: the command's own module (and torch with it) is imported only after that.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable


def _prepare(preload: bool = True) -> None:
    import logging

    # A log line that cannot reach the run's log file (a full disk) is dropped rather than printed with a traceback:
    # the console has it, and the failing write that matters is reported in one line.
    logging.raiseExceptions = False
    if preload:
        from trainer.cli.allocator import preload_mimalloc

        preload_mimalloc()  # re-executes this process once; returns at once in the re-executed one
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _command(module: str, usage: str, preload: bool = True) -> Callable[[], None]:
    def command() -> None:
        _prepare(preload)
        importlib.import_module(f"trainer.cli.{module}").run()

    command.__doc__ = usage
    command.__name__ = command.__qualname__ = module
    return command


train = _command("train", "`htt-train [group=option ...] [key=value ...]`: train (the composition root, cli/train.py).")
eval = _command("eval", "`htt-eval ckpt=PATH [dataset=...] [split=val]`: evaluate a checkpoint.")  # noqa: A001
predict = _command("predict", "`htt-predict CKPT IMAGE... [--top K]`: classify image files.")
export = _command("export", "`htt-export CKPT [--format torchscript onnx]`: model files, each verified.")
lr_find = _command("lr_find", "`htt-lr-find [group=option ...]`: the learning-rate range test.")
data = _command("provision_data", "`htt-data [DATASET ...] [--mirror DIR]`: provision MNIST and FashionMNIST.",
                preload=False)
make_data = _command("make_data", "`htt-make-data {counts,mosaic,rotation}`: a generated dataset for a task.",
                     preload=False)
# summarize reads run directories only: no torch, so no allocator to preload
summarize = _command("summarize", "`htt-summarize [DIR]`: a sorted table of the runs under DIR.", preload=False)
