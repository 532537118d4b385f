"""Several processes training one model (DistributedDataParallel), started by torchrun or submitit.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment. Under Hydra's submitit
launcher (SLURM, or its local executor) each of a job's tasks is one process, and submitit's own helper
exports the same variables. Without either (a plain `python train.py`) everything here is the
single-process no-op, so the rest of the code needs no special case for "not distributed".
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td

from trainer.errors import UserError

BACKENDS = ("auto", "gloo", "nccl")


class Dist:
    """This process's place in the job: `rank` of `world_size` processes, on `device`.

    A plain class, not a dataclass: Hydra's instantiate would turn a dataclass argument into a config dict.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                 backend: str | None = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.backend = backend  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, TensorBoard events and console output."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group was joined: under torchrun, even of one process (the same DDP and nccl path as N)."""
        return self.backend is not None

    def for_training(self, net: torch.nn.Module) -> torch.nn.Module:
        """`net` as the training steps call it: through DDP, which averages gradients across ranks in backward.
        Evaluation calls `net` itself (no collectives per batch, so ranks with fewer batches do not wait)."""
        if not self.active:
            return net
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a picklable value)."""
        if not self.active:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value`."""
        if not self.active:
            return value
        t = torch.tensor([value], device=self.device if self.backend == "nccl" else "cpu")
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return int(t)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's (in place)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                td.broadcast(tensor, src=0)

    def close(self) -> None:
        if self.active and td.is_initialized():
            td.destroy_process_group()


def lost_peer_message(e: BaseException, timeout_s: float) -> str | None:
    """A one-line explanation if `e` is a collective that failed because another rank died or stopped
    answering (the backends raise plain RuntimeErrors for that), else None."""
    if not (td.is_available() and td.is_initialized() and isinstance(e, RuntimeError)):
        return None
    text = str(e).strip()
    if not any(s in text for s in ("gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection", "connection")):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's [source.cc:line] prefix
    return (f"rank {td.get_rank()} of {td.get_world_size()}: lost another process of the job ({first}); its "
            f"own output says why. A process that stops answering is given up on after "
            f"distributed.timeout_s={timeout_s:g}s")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def init_from_env(*, backend: str, timeout_s: float, device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment, or return the single-process Dist.

    `backend`: auto picks nccl for CUDA devices and gloo otherwise. `timeout_s` bounds how long a rank
    waits for the others in any collective, so a rank that died stops the rest with an error instead of
    a hang. On CUDA each process takes the GPU `cuda:LOCAL_RANK` of its node.
    """
    if backend not in BACKENDS:
        raise UserError(f"distributed.backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise UserError(f"distributed.timeout_s={timeout_s!r}: must be a number > 0")
    export_submitit_env()
    world = world_size_from_env()
    # torchrun of one process still joins a group of one: `--nproc_per_node=1` on a 1-GPU machine then runs
    # the same DDP and nccl code as N processes (TORCHELASTIC_RUN_ID is set by torchrun alone).
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist(device=device)
    rank, local_rank = rank_from_env(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                            "start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise UserError("trainer.device=mps: torchrun with several processes needs cpu or cuda")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"distributed.backend=nccl needs CUDA devices (trainer.device is {device}); use gloo")
    td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                          device_id=device if device.type == "cuda" else None)
    if rank != 0:  # under submitit the tasks share the job's run directory and log file: rank 0 speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    return Dist(rank=rank, world_size=td.get_world_size(), device=device, backend=backend)


def export_submitit_env() -> None:
    """Inside a submitit job of several tasks (Hydra's submitit launcher with `tasks_per_node` > 1 or
    `nodes` > 1), export the variables torchrun would set: MASTER_ADDR/PORT (the job's first node, a
    port derived from the job id), RANK, WORLD_SIZE, LOCAL_RANK. Does nothing elsewhere."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)  # each rank picks cuda:LOCAL_RANK itself


def worker_hydra_overrides() -> list[str]:
    """Hydra overrides for ranks other than 0: no run directory of their own (rank 0's is broadcast), no
    saved .hydra config, console messages at WARNING and above only.

    Hydra resolves the run directory's `${now:...}` in each process, so without this every rank would
    create a directory of its own. Their log file goes to a temporary directory, removed at exit.
    """
    if world_size_from_env() <= 1 or rank_from_env() == 0:
        return []
    scratch = tempfile.mkdtemp(prefix=f"train-rank{rank_from_env()}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
