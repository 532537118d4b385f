"""What this machine and process have: the device to train on, free memory (host and device), the malloc in use,
and the time since the process started. Nothing here changes process state."""

from __future__ import annotations

import os
import time

import torch

from trainer.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist. CUDA comes with its index."""
    if name == "auto":
        if torch.cuda.is_available():
            return canonical_device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"trainer.device={name!r}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"trainer.device={name!r}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name!r} but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name!r} but MPS is not available here; use auto or cpu")
    return canonical_device(device)


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` with its index where it has one: `cuda` becomes the current CUDA device (`cuda:0`, usually).
    Why: torch.device("cuda") != torch.device("cuda:0"), yet a tensor moved to either reports cuda:0, so a
    comparison of a tensor's device with an unindexed one is always false."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seconds_since_process_start() -> float:
    """Wall time since this process started (from /proc on Linux): timings include the interpreter's and the
    imports' start-up."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, or less where a cgroup limit (v1 or v2) leaves
    less. Physical memory is the wrong budget on a shared machine, and a container's limit kills before it runs out."""
    found = [host_memory_bytes()]
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        with open("/proc/self/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
    except (OSError, ValueError):
        groups = []
    for _, controllers, where in groups:
        if controllers == "":  # v2
            limit, usage = f"/sys/fs/cgroup{where}/memory.max", f"/sys/fs/cgroup{where}/memory.current"
        elif "memory" in controllers.split(","):  # v1
            limit, usage = (f"/sys/fs/cgroup/memory{where}/memory.{n}" for n in ("limit_in_bytes", "usage_in_bytes"))
        else:
            continue
        try:
            with open(limit) as a, open(usage) as b:
                found.append(int(a.read()) - int(b.read()))
        except (OSError, ValueError):  # "max" (no limit), or not visible from this namespace
            pass
    return max(0, min(found))


def device_free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device (what the data may take, less the margin)."""
    return torch.cuda.mem_get_info(device)[0]


def size_text(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def allocator_in_use() -> str:
    """`mimalloc` if it serves this process's malloc, else `system`."""
    try:
        with open("/proc/self/maps") as f:
            return "mimalloc" if "libmimalloc" in f.read() else "system"
    except OSError:
        return "system"
