"""The commands, `htt-train`, `htt-eval`, ... (installed) or `python train.py`, `python eval.py`, ... (a checkout).

`trainer.cli.entry` holds what each command does to its process before anything else: the allocator, the current
folder on the import path, one-line errors and the fast exit. The command modules themselves (`train` is the
composition root) can be imported, by the tests or a user's script, without any of that.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that rebuilds a model from a checkpoint (predict, export): the checkpoint, where
    its options are and whether to trust it (trainer.cli.config.rebuildable_config)."""
    parser.add_argument("ckpt", help="a checkpoint written by htt-train (train.py): best.pt or last.pt")
    parser.add_argument("--config-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="your project's configs folder, for a model or dataset option of your own (as "
                             "htt-train --config-dir DIR); may be given more than once")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="rebuild the model from the checkpoint's own config, classes included (only for files "
                             "you trust)")


def require_dirs(dirs: list[Path]) -> list[Path]:
    """`dirs` (--config-dir), each an existing folder, else UserError naming it."""
    from trainer.errors import UserError

    for d in dirs:
        if not d.is_dir():
            raise UserError(f"--config-dir {d}: not a folder" + ("" if d.exists() else " (it does not exist)"))
    return dirs
