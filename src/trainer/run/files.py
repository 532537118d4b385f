"""Crash-safe file writes, and the clean-up of refused runs."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from trainer.errors import OutputError, UserError
from trainer.run.untrusted import file_kind

CLAIM_MARKER = ".run_dir_claim"  # claims a run directory when hydra.output_subdir=null (Hydra saves no .hydra/)
RUN_LOCK = ".lock"  # held by the process training in a run directory (lock_run_dir)
# How long a temporary file stays out of reach of remove_stale_temps after its last write: it covers the moment
# between its creation and its writer's lock, and a writer on another machine sharing the folder (network file
# systems may not pass locks on), whose writes keep the file's time fresh.
STALE_AFTER_S = 10


def current_umask() -> int:
    """This process's umask, read without changing it (Linux reports it in /proc since 4.7). Elsewhere the only
    way is to set it and set it back, which is done here, at the moment it is needed, never at import."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one:
    the rename is atomic on POSIX, and fsyncing the file before (and the directory after) makes it
    survive a power loss too.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _hold(fd)  # while this writer lives, remove_stale_temps leaves its file alone
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600: the mode a plain open() would give
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        failed = os_error_in(e)
        if failed is None:
            raise
        raise OutputError(f"cannot write {path}: {failed.strerror or failed}; the file there before, if any, "
                          "is intact") from None


def scratch_file(beside: Path) -> tuple[Path, int]:
    """A temporary file beside `beside`, named as `atomic_write` names its own (so a killed run's is removed by
    `remove_stale_temps` later), and held by this process until the returned descriptor is closed."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=".tmp", dir=beside.parent)
    _hold(fd)
    return Path(tmp), fd


def _hold(fd: int) -> None:
    """Take a shared flock on an open temporary file: released when its writer closes it or dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; remove_stale_temps removes nothing there
        return
    with contextlib.suppress(OSError):  # a file system without locks: STALE_AFTER_S alone protects the file
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def temp_pattern(names: str) -> re.Pattern:
    """The names of the temporary files `atomic_write` makes for a file named by the regular expression `names`
    (tempfile.mkstemp's: ".<name>.<8 of a-z, 0-9, _>.tmp")."""
    return re.compile(rf"\.(?:{names})\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temps(folder: Path, names: str, grace_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files that `atomic_write` left in `folder` for the files named by `names` (a regular
    expression) when its process was killed mid-write; return them. Only this code's own names are touched (the
    folder may be the user's data folder, or shared with other programs), and never one a live writer holds:
    each writer holds a flock on its file until it is renamed, so a file whose lock can be taken has no writer.
    A file written in the last `grace_s` seconds is left for a later run too (0 where a lock on the folder
    already keeps every other writer out)."""
    try:
        import fcntl
    except ImportError:
        return []
    pattern, removed = temp_pattern(names), []
    try:
        entries = [e for e in os.scandir(folder) if pattern.fullmatch(e.name)]
    except OSError:  # no folder yet: nothing was left in it
        return []
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone since the listing (renamed into place), or a symlink: not ours
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < grace_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                continue
            now = os.lstat(entry.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still the file that was checked
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # removed by someone else meanwhile, or a folder we may not write: left as it is
        finally:
            os.close(fd)
    return removed


def require_free_space(path: Path, need: int, what: str) -> None:
    """Raise OutputError, before any work is done, if the disk that `path` (or its nearest existing parent)
    is on has fewer than `need` bytes free for `what`."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OutputError(f"{existing} has {free / 2**20:.1f} MiB free, but {what} need about {need / 2**20:.1f} MiB; "
                          "free some space or set output_root to another disk")


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`, if any: torch.save reports a full disk as a RuntimeError whose context
    is the OSError (ENOSPC)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:  # not e.g. gzip.BadGzipFile, an OSError too
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def discard_refused_run(run_dir: Path, output_root: Path) -> None:
    """Remove the directory Hydra made for a run that was refused before training (a bad value, a missing
    file), and the dated folders above it that this leaves empty, so refused runs do not pile up beside
    real ones. Only a directory holding nothing but Hydra's own `.hydra/`, log files, TensorBoard event
    files (the config text) and the run's lock is removed: a run that wrote anything else (a checkpoint, metrics)
    is left alone.
    """
    run_dir = Path(run_dir)

    def ours(p: Path) -> bool:
        return p.name in (".hydra", CLAIM_MARKER, RUN_LOCK) or p.suffix == ".log" or p.name.startswith("events.out.")

    if not run_dir.is_dir() or not all(ours(p) for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    root, parent = Path(output_root).resolve(), run_dir.resolve().parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only if empty: another run may share the date folder
        except OSError:
            return
        parent = parent.parent


def lock_run_dir(run_dir: Path, in_use: str = "") -> BinaryIO | None:
    """Hold an exclusive lock on `run_dir` for as long as the returned file stays open (this process's life).

    A second process that would train in the same run directory (a resume of a run that is still training,
    two resumes of one run at once) gets a UserError instead of interleaving its checkpoints with the first's;
    `in_use` replaces what that error says after the directory's name.
    The kernel drops the lock when the holder exits, however it exits, so a killed run never blocks its resume.
    A POSIX record lock (lockf), not flock: it belongs to the process, so one process may build several Trainers
    on one directory (in-process tests, notebooks) while any other process is kept out.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded
        return None
    lock = run_dir / RUN_LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a .lock that is a symlink (a copied or crafted run directory) would otherwise create or
        # append to the file it points at; O_NONBLOCK: a FIFO there fails at once instead of waiting for a reader.
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{lock} is a symbolic link; a run directory's lock is a file this code makes "
                            "(remove the link)") from None
        raise OutputError(f"cannot lock {run_dir} for this run: {e.strerror or e} ({e.filename or lock})") from None
    f = os.fdopen(fd, "ab")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{lock} is {file_kind(mode)}, not the lock file this code makes (remove it)")
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise OutputError(f"cannot lock {lock}: {e.strerror or e}") from None
        raise UserError(f"{run_dir} is in use by " + (in_use or "another process training in it (a run still "
                        "going, or another resume of it); wait for it to end, or stop it first")) from None
    except UserError:
        f.close()
        raise
    return f
