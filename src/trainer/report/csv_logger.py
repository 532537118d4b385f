"""`logger=csv`: the run's scalars as one table, `metrics.csv` in the run directory."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from trainer.errors import OutputError, UserError
from trainer.report.tracker import Tracker
from trainer.run.files import atomic_write
from trainer.run.untrusted import read_regular

MAX_CSV_BYTES = 256 * 2**20  # a long run logs a few MiB; a bigger file is not this tracker's


class CSVLogger(Tracker):
    """`metrics.csv`: one row per logged step, one column per metric key (`step` first, then the keys in the order
    they first appear), empty where a step did not log a key.

    Every call at one step fills the same row (the epoch's metrics and the test's share the last training step).
    The file is rewritten atomically, whole, at `flush()` (after each checkpoint), at `close()` and at most every
    `flush_secs` while logging, so a kill leaves the last complete table. On resume (`purge_step`), the rows from
    `purge_step` on, which the interrupted run logged after its checkpoint, are dropped: the resumed run logs
    them again, so no step is duplicated or missing.
    """

    FILE = "metrics.csv"

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, flush_secs: float = 30) -> None:
        super().__init__(log_dir, purge_step)
        self.path, self.flush_secs = self.log_dir / self.FILE, flush_secs
        self.columns: list[str] = []  # metric keys, first-seen order
        self.rows: dict[int, dict[str, float]] = {}  # step -> key -> value
        if purge_step is not None and self.path.exists():
            self._read_kept(purge_step)
        self.dirty, self.written_at = False, time.monotonic()

    def _read_kept(self, purge_step: int) -> None:
        """The rows of the interrupted run before `purge_step`. The file is checked as any file from elsewhere."""
        text = read_regular(self.path, MAX_CSV_BYTES).decode("utf-8", errors="replace")
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        if not header or header[0] != "step" or len(set(header)) != len(header):
            raise UserError(f"cannot resume {self.path}: not a metrics table of this logger (its first column must "
                            "be `step`, each column named once); move it away to start a new table")
        self.columns = header[1:]
        for line, row in enumerate(reader, start=2):
            try:
                step = int(row[0])
                values = {key: float(v) for key, v in zip(self.columns, row[1:], strict=True) if v != ""}
            except (ValueError, IndexError):
                raise UserError(f"cannot resume {self.path}: line {line} is not a step followed by "
                                f"{len(self.columns)} numbers; move the file away to start a new table") from None
            if step < purge_step:
                self.rows[step] = values

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = self.rows.setdefault(int(step), {})
        for key, value in metrics.items():
            if key not in row and key not in self.columns:
                self.columns.append(key)
            row[key] = float(value)
        self.dirty = True
        if time.monotonic() - self.written_at > self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if not self.dirty:
            return
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["step", *self.columns])
        for step in sorted(self.rows):
            row = self.rows[step]
            writer.writerow([step, *(_cell(row[key]) if key in row else "" for key in self.columns)])
        try:
            with atomic_write(self.path) as f:
                f.write(out.getvalue().encode())
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}; the checkpoints written before are "
                              "intact") from None
        self.dirty, self.written_at = False, time.monotonic()

    def close(self) -> None:
        self.flush()


def _cell(value: float) -> str:
    """The shortest text that reads back as the same float (`repr`), `nan`/`inf` as Python and pandas read them."""
    return repr(value) if math.isfinite(value) else str(value)
