"""`callbacks=[keep_checkpoints]`: keep the checkpoint of every N-th epoch beside last.pt and best.pt."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import require_int
from trainer.loop.callbacks import Callback

if TYPE_CHECKING:
    from trainer.loop.trainer import Trainer

EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


class KeepCheckpoints(Callback):
    """After every `every_n_epochs`-th epoch, `epoch_<N>.pt` in the checkpoint directory: the epoch's last.pt
    under a name the next epoch does not replace; eval.py, predict.py, export.py and `trainer.resume` take it as
    any checkpoint. `keep_last`: only the newest that many are kept (None: all).

    The file is a hard link to last.pt (last.pt is replaced by a rename, so the link keeps this epoch's bytes
    and costs no space until then), or a copy where the file system has no hard links. Rank 0 only.
    """

    def __init__(self, every_n_epochs: int = 1, keep_last: int | None = None) -> None:
        self.every_n_epochs = require_int("callbacks.keep_checkpoints.every_n_epochs", every_n_epochs, 1)
        self.keep_last = None if keep_last is None else require_int("callbacks.keep_checkpoints.keep_last",
                                                                    keep_last, 1)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        epoch, mid_epoch = trainer.progress.epoch, trainer.progress.batch_in_epoch > 0
        if path.name != "last.pt" or mid_epoch or epoch % self.every_n_epochs or not trainer.dist.is_main:
            return
        kept = path.with_name(f"epoch_{epoch:03d}.pt")
        temp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
        temp.unlink(missing_ok=True)
        try:
            os.link(path, temp)
        except OSError:  # no hard links here (some network and FAT file systems): a copy, written atomically
            temp.write_bytes(path.read_bytes())
        os.replace(temp, kept)  # an epoch run again after a resume replaces its file whole
        if self.keep_last is not None:
            epochs = sorted((int(m.group(1)), p) for p in path.parent.iterdir() if (m := EPOCH_FILE.fullmatch(p.name)))
            for _, old in epochs[:-self.keep_last]:
                old.unlink(missing_ok=True)
