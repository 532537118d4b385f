"""SIGINT and SIGTERM during a run: the first one asks the loop to stop after the current optimizer step, with a
checkpoint; a second one (or the first, where a phase cannot stop halfway) stops at once."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from trainer.distributed import Dist

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run. `checkpoint` is the one to resume from; `saved`: it was written for
    this stop (else it is the last one written before, or None when the run wrote none)."""

    def __init__(self, signum: int, checkpoint: Path | None, what: str, saved: bool = True) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        if saved:
            super().__init__(f"stopped by {name} {what}; checkpoint saved to {checkpoint}")
        elif checkpoint is not None:
            super().__init__(f"stopped at once by {name} {what}; the last checkpoint written, {checkpoint}, is intact")
        else:
            super().__init__(f"stopped at once by {name} {what}, before the run wrote a checkpoint")


class StopSignals:
    """Catches SIGINT/SIGTERM while `catching()` is entered; the loop asks `requested()` at its safe points.

    `last_checkpoint` is the file a stop at once points the user to (when it exists).
    """

    def __init__(self, dist: Dist, last_checkpoint: Path) -> None:
        self.dist, self.last_checkpoint = dist, last_checkpoint
        self.signum: int | None = None  # the first signal caught
        self._at = 0.0  # time.monotonic() of that signal

    @contextlib.contextmanager
    def catching(self, where: Callable[[], str], at_once: bool = False) -> Iterator[None]:
        """Install the handlers. A second signal, or the first one with `at_once`, raises TrainingInterrupted
        at once (the atomic writes keep every checkpoint whole), naming `where()` the run was."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.signum is not None or at_once:
                # torchrun relays the terminal's Ctrl-C to its workers, which got it from the terminal too:
                # the same request twice within moments, not a second one.
                if not (self.dist.active and time.monotonic() - self._at < 5):
                    last = self.last_checkpoint
                    raise TrainingInterrupted(signum, last if last.is_file() else None, where(), saved=False)
                return
            self.signum, self._at = signum, time.monotonic()
            log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)",
                        signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def requested(self, ranks_may_agree: bool = True) -> int | None:
        """The signal that asks this run to stop now, or None.

        Under torchrun a signal can reach the ranks at different steps, and they must all stop at the same one.
        Agreeing costs a collective (and a host sync on CUDA), so the loop passes `ranks_may_agree` only at log
        points and epoch ends; elsewhere no rank stops.
        """
        if self.dist.active:
            if not ranks_may_agree:
                return None
            self.signum = self.dist.max_int(self.signum or 0) or None
        return self.signum
