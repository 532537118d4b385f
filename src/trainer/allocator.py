"""mimalloc for the training process instead of glibc's malloc, preloaded by re-executing once at start-up.

Why: glibc's malloc serves PyTorch's CPU tensors badly. Training and evaluation batches of different sizes
fragment its heap, so a one-epoch MNIST CNN run peaked anywhere from 1100 to 1390 MiB from run to run, and
memory it hands back to the kernel is faulted in again a few steps later. mimalloc keeps and reuses its
pages: the same run peaks at 965-974 MiB every time and its epoch is about 18% faster (docs/performance.md
"Memory and start-up"). malloc can only be replaced before a process starts (LD_PRELOAD), hence the re-exec. It happens
before torch is imported and keeps the process id, so it costs a few tens of milliseconds and nothing else.

This module imports nothing heavy: scripts call `preload_mimalloc()` before their other imports.
"""

from __future__ import annotations

import os
import sys

ENV = "TRAINER_ALLOCATOR"  # mimalloc (the default) or system
CHOICES = ("mimalloc", "system")
_PRELOADED = "_TRAINER_MIMALLOC_PRELOADED"  # set for the re-executed process; holds the caller's LD_PRELOAD


def mimalloc_library() -> str | None:
    """Path of the libmimalloc.so the `cmeel-mimalloc` package installed, or None without it."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        found = [f for f in files("cmeel-mimalloc") or () if f.name.startswith("libmimalloc.so")]
    except PackageNotFoundError:
        return None
    paths = [str(f.locate()) for f in sorted(found, key=lambda f: len(f.name))]
    return next((p for p in paths if os.path.isfile(p)), None)


def preload_mimalloc() -> None:
    """Re-execute this process with mimalloc preloaded, once; return at once where that does not apply.

    It applies on Linux, when `cmeel-mimalloc` is installed, `TRAINER_ALLOCATOR` is not `system`, and
    LD_PRELOAD does not already name an allocator (a user's jemalloc or tcmalloc is left alone).
    In the re-executed process it restores the caller's LD_PRELOAD, so programs this one starts
    (tensorboard, apt-get, ...) run with their usual malloc.
    """
    if _PRELOADED in os.environ:
        original = os.environ.pop(_PRELOADED)
        if original:
            os.environ["LD_PRELOAD"] = original
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    choice = os.environ.get(ENV, "mimalloc")
    if choice not in CHOICES:
        print(f"error: {ENV}={choice!r}: use one of {', '.join(CHOICES)}", file=sys.stderr)
        sys.exit(1)
    preload = os.environ.get("LD_PRELOAD", "")
    if choice == "system" or sys.platform != "linux" or "malloc" in preload:
        return
    library = mimalloc_library()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip(), _PRELOADED: preload}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # could not re-execute: carry on with the system malloc


def allocator_in_use() -> str:
    """`mimalloc` if it serves this process's malloc, else `system`."""
    try:
        with open("/proc/self/maps") as f:
            return "mimalloc" if "libmimalloc" in f.read() else "system"
    except OSError:
        return "system"
