"""Run a command on a file from elsewhere the way a user would, and measure what its refusal costs.

`run_bounded` starts `python ARGV...` from the repo root as a fresh process (never the fork server: its peak
memory must be the command's own) and watches it from outside. A watchdog thread reads the child's resident
memory from /proc every 20 ms and kills it when it passes `cap_mib`, so a test of a memory bomb that is not
refused fails with a clear message instead of taking this machine (or CI) down with it. The peak reported is the
kernel's own count (`ru_maxrss` from wait4), which the watchdog's sampling cannot miss.

A small spawner process forks the command and reports that count. Linux carries a process's peak RSS across exec
from the memory image the exec replaces, and subprocess starts a child with vfork, in pytest's own image: every
command then reported pytest's peak (172 MiB above the baseline for each, once one test had grown pytest). A
fork of the spawner starts from the spawner's few MiB.

The bound a test states is above the process's baseline: `baseline_mib()` is the peak of the same kind of
process that only imports what a command imports (python, torch, hydra, the package) and exits.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Bounded:
    returncode: int
    stdout: str
    stderr: str
    peak_mib: float  # the child's peak resident memory, as the kernel counts it
    seconds: float  # wall time, process start to exit
    killed_over_cap: bool  # the watchdog killed it for passing cap_mib

    def one_line(self) -> str:
        """The single `error: ...` line the command must end with (asserted), without its prefix."""
        lines = self.stderr.strip().splitlines()
        assert not self.killed_over_cap, f"killed at the memory cap after {self.seconds:.1f}s: {self.stderr[-2000:]}"
        assert self.returncode == 1, f"exit {self.returncode}: {self.stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr[-4000:]
        return lines[0].removeprefix("error: ")


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# Forks the command (argv[2:]), tells the parent its pid, waits, then reports its exit status and peak RSS (KiB).
_SPAWNER = """
import os, sys
report = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(report)
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
os.write(report, b"%d\\n" % pid)
_, status, usage = os.wait4(pid, 0)
os.write(report, b"%d %d\\n" % (status, usage.ru_maxrss))
"""


def run_bounded(argv: list[str], *, cap_mib: float = 4096, timeout: float = 120,
                env: dict[str, str] | None = None, cwd: Path = REPO) -> Bounded:
    """`python ARGV...`, killed past `cap_mib` of resident memory or `timeout` seconds; see the module doc."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        read_end, write_end = os.pipe()
        with open(out, "wb") as o, open(err, "wb") as e, os.fdopen(read_end, "rb") as reports:
            start = time.perf_counter()
            spawner = subprocess.Popen([sys.executable, "-c", _SPAWNER, str(write_end), *argv], cwd=cwd, stdout=o,
                                       stderr=e, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                       pass_fds=(write_end,))
            os.close(write_end)
            pid = int(reports.readline())
            killed, done = threading.Event(), threading.Event()

            def watch() -> None:
                while not done.is_set():
                    if _rss_mib(pid) > cap_mib or time.perf_counter() - start > timeout:
                        killed.set()
                        try:
                            os.kill(pid, 9)
                        except ProcessLookupError:
                            pass
                        return
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            status, maxrss = map(int, reports.readline().split())
            seconds = time.perf_counter() - start
            done.set()
            spawner.wait()
            watcher.join()
        return Bounded(os.waitstatus_to_exitcode(status), out.read_text(errors="replace"),
                       err.read_text(errors="replace"), maxrss / 1024, seconds, killed.is_set())


@functools.lru_cache(maxsize=None)
def baseline_mib() -> float:
    """Peak resident memory of a process that imports what the commands import, then exits."""
    done = run_bounded(["-c", "import torch, hydra, omegaconf, trainer.run.checkpoint, trainer.cli.config, "
                              "trainer.data"])
    assert done.returncode == 0, done.stderr
    return done.peak_mib
