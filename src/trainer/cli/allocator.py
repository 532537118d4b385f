"""mimalloc for the training process instead of glibc's malloc, preloaded by re-executing once at start-up.

Why: glibc's malloc serves PyTorch's CPU tensors badly. Training and evaluation batches of different sizes
fragment its heap, so a one-epoch MNIST CNN run peaked anywhere from 1100 to 1390 MiB from run to run, and
memory it hands back to the kernel is faulted in again a few steps later. mimalloc keeps and reuses its
pages: the same run peaks at 965-974 MiB every time and its epoch is about 18% faster (docs/performance.md
"Memory and start-up"). malloc can only be replaced before a process starts (LD_PRELOAD), hence the re-exec. It happens
before torch is imported and keeps the process id, so it costs a few tens of milliseconds and nothing else.

mimalloc alone would turn an impossible allocation into an out-of-memory kill: where the kernel overcommits
(vm.overcommit_memory 0 or 1) it maps memory with MAP_NORESERVE, which skips the kernel's check that refuses
glibc an allocation larger than RAM + swap. `torch.empty` of 3 TB "succeeded" in 0.00 s, and filling it grew until
the kernel killed a process, possibly another one; no mimalloc option changes that without refusing every
allocation of 2 GiB or more (measured: docs/performance.md). So the re-executed process runs with its writable
private memory (RLIMIT_DATA, which counts those mappings) capped at RAM + swap: the same allocation then fails at
once with torch's "can't allocate memory", as under glibc, and the speed and memory figures stay mimalloc's.

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
    cap_data_at_memory()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # could not re-execute: carry on with the system malloc


def cap_data_at_memory() -> None:
    """Lower this process's RLIMIT_DATA (writable private memory, Linux >= 4.7) to RAM + swap, where it is higher:
    an allocation larger than the machine then fails at once under mimalloc too (see the module doc). It is what
    glibc's own check allows; GPU drivers reserve their address space without write access, which it does not
    count. Processes this one starts inherit it."""
    import resource

    swap = 0
    try:
        with open("/proc/meminfo") as f:
            swap = next((int(line.split()[1]) * 1024 for line in f if line.startswith("SwapTotal:")), 0)
    except (OSError, ValueError):
        pass
    cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + swap
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


