"""`trainer.cuda_graphs=true`: a whole training step captured once as a CUDA graph and replayed.

Why: a small model's step on a GPU is bound by the host, not the device. Each of its few dozen kernels costs
the CPU several microseconds to launch through PyTorch, and the GPU waits. A replayed graph launches all of
them at once: forward, loss, backward, gradient clipping and the optimizer step.

How it stays the same training:
- **Static inputs.** The graph reads its batch from two fixed buffers. Each step copies the batch that the
  device-side gather and normalisation made into them (two copies on the GPU, no host sync).
- **Warm-up.** The first `warmup_steps` steps run eagerly on a side stream, as torch's CUDA-graph guide
  requires. They are real training steps: they create the optimizer's state, cuBLAS's workspaces and cuDNN's
  chosen algorithms before anything is captured.
- **Scheduled values.** A graph replays the numbers it was captured with. So the optimizer is captured reading
  its learning rate from a one-element GPU tensor. Before each replay that tensor takes the value the LR
  schedule left in the param group: one `fill_` when it changed, with no host sync. That is why only Adam
  and AdamW are accepted: their `capturable` step reads a tensor LR. SGD's step turns a tensor LR into a host
  number. The betas stay host numbers, fixed at capture, so a schedule that cycles beta1
  (`scheduler.cycle_momentum=true`) is refused. Tensor betas were not tried on a GPU: torch's foreach Adam
  passes beta1 to ops that take a host number (`_foreach_pow`), which a capture cannot read.
- **Outputs.** The next replay overwrites the captured logits and loss, so each step returns copies of them.
- **Other batch sizes.** A batch of another size (an epoch's last, short one) runs eagerly. The graph's
  gradient tensors are zeroed in place, not dropped, because the graph's optimizer step reads them.

What it refuses, in one line each: devices other than CUDA, optimizers other than Adam and AdamW, a cycled
beta1, fp16 (GradScaler's inf check reads the host), gradient accumulation, skipping non-finite losses, several
processes (DDP) and `trainer.compile`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from trainer.errors import UserError

log = logging.getLogger(__name__)
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
GRAPHABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def check_cuda_graphs(*, device: torch.device, optimizer: torch.optim.Optimizer, scheduler: object, precision: str,
                      accumulate_grad_batches: int, nonfinite_loss: str, world_size: int, compile: bool) -> None:
    """Raise UserError naming the first setting that `trainer.cuda_graphs=true` cannot replay."""
    def refuse(what: str) -> UserError:
        return UserError(f"trainer.cuda_graphs=true {what}; set trainer.cuda_graphs=false")

    if device.type != "cuda":
        raise refuse(f"needs a CUDA device (trainer.device is {device})")
    if not isinstance(optimizer, GRAPHABLE_OPTIMIZERS):
        raise refuse(f"works with optimizer=adam or adamw (their step reads the scheduled LR from the GPU), "
                     f"not {type(optimizer).__name__}")
    if getattr(scheduler, "cycle_momentum", False):
        raise refuse("replays the betas it was captured with, and this schedule cycles beta1; set "
                     "scheduler.cycle_momentum=false")
    if precision == "fp16":
        raise refuse("cannot replay fp16's gradient scaler (it reads its inf check on the host); use bf16")
    if accumulate_grad_batches != 1:
        raise refuse(f"steps on every batch (trainer.accumulate_grad_batches={accumulate_grad_batches})")
    if nonfinite_loss != "error":
        raise refuse("cannot skip single batches (trainer.nonfinite_loss=skip)")
    if world_size > 1:
        raise refuse(f"runs in one process ({world_size} processes here)")
    if compile:
        raise refuse("and trainer.compile=true are two ways to the same end: choose one")


def capture(graph: object, step: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Capture `step()` into `graph` (nothing runs: replay() runs it), returning its static outputs. A graph
    other than torch.cuda.CUDAGraph captures itself: the CPU tests' stand-in, `graph.capture(step)`."""
    if isinstance(graph, torch.cuda.CUDAGraph):
        with torch.cuda.graph(graph):
            return step()
    return graph.capture(step)


class GraphedStep:
    """Call it with a batch, `(images, targets)`, to take one training step. It returns copies of the
    `(logits, loss)` that `step` computed for that batch.

    `step(images, targets)` runs forward, loss and backward, then steps `optimizer`. It must leave the
    gradients in place and make no host sync. Every step is eager until `warmup_steps` have run, then a
    full-size step is captured. From then on, every batch of that size replays the capture.
    `graph_factory` makes the graph object: `torch.cuda.CUDAGraph` on a GPU, a stand-in in the CPU tests.
    """

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, device: torch.device, warmup_steps: int = 3,
                 graph_factory: Callable[[], object] | None = None) -> None:
        self.step, self.optimizer, self.device, self.warmup_steps = step, optimizer, device, warmup_steps
        self.graph_factory = graph_factory or torch.cuda.CUDAGraph
        self.graph: object | None = None
        self.eager_steps = 0
        self.replays = 0
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per param group: the GPU tensor the captured step reads its LR from, and the host value it holds now.
        self._lrs: list[torch.Tensor] = []
        self._held: list[float] = []
        self._betas: list[tuple] = []  # captured as host numbers: a schedule must not change them

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None and self._inputs is not None and images.shape == self._inputs[0].shape:
            return self._replay(images, targets)
        if self.graph is None and self.eager_steps >= self.warmup_steps:
            return self._capture(images, targets)
        return self._eager(images, targets)

    def _eager(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.eager_steps += 1
        with self._capturable(), self._side_stream() as finish:
            if self.graph is not None:  # the graph's optimizer reads these gradient tensors: zero, do not drop
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch._foreach_zero_(grads)
            logits, loss = self.step(images, targets)
            if self.graph is None:  # the capture needs gradients that do not exist yet (backward creates them)
                self.optimizer.zero_grad(set_to_none=True)
            return finish(logits.detach(), loss.detach())

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._inputs = (images.clone(), targets.clone())  # the static buffers every replay reads
        self.optimizer.zero_grad(set_to_none=True)
        groups = self.optimizer.param_groups
        self._held = [float(group["lr"]) for group in groups]
        self._lrs = [torch.tensor(lr, dtype=torch.float32, device=self.device) for lr in self._held]
        self._betas = [tuple(group["betas"]) for group in groups]
        graph = self.graph_factory()
        self._outputs = capture(graph, self._captured_step)
        self.graph = graph
        log.info("trainer.cuda_graphs: the training step is captured after %d eager steps; every batch of %d now "
                 "replays it", self.eager_steps, len(images))
        graph.replay()  # capturing ran nothing: this replay is this batch's step
        self.replays += 1
        return self._outputs[0].clone(), self._outputs[1].clone()

    def _captured_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step as it is captured: on the static inputs, the optimizer reading its LR from the GPU."""
        with self._capturable(), self._reading(self._lrs):
            logits, loss = self.step(*self._inputs)
        return logits.detach(), loss.detach()

    def _replay(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._follow_schedule()
        self._inputs[0].copy_(images)
        self._inputs[1].copy_(targets)
        self.graph.replay()
        self.replays += 1
        logits, loss = self._outputs
        return logits.clone(), loss.clone()  # the next replay overwrites the outputs

    def _follow_schedule(self) -> None:
        """Give the captured step the LR the schedule has set since the last step."""
        for group, lr, held, betas in zip(self.optimizer.param_groups, self._lrs, self._held, self._betas):
            if group["lr"] != held:
                lr.fill_(group["lr"])  # an asynchronous kernel: no host sync
            if tuple(group["betas"]) != betas:  # check_cuda_graphs refuses the schedules that would do this
                raise RuntimeError(f"betas changed from {betas} to {group['betas']} after the CUDA graph's capture")
        self._held = [group["lr"] for group in self.optimizer.param_groups]

    @contextlib.contextmanager
    def _reading(self, lrs: list[torch.Tensor]) -> Iterator[None]:
        """The param groups hold `lrs`' tensors while the step is captured, their floats again after."""
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr

    @contextlib.contextmanager
    def _capturable(self) -> Iterator[None]:
        """Adam's capturable step (its step count on the device) for this step only: a checkpoint keeps the
        plain setting, so it resumes without graphs, or on a CPU, as any other."""
        if self.device.type != "cuda":  # the CPU tests' stand-in graph: torch refuses capturable on a CPU
            yield
            return
        groups = self.optimizer.param_groups
        saved = [group.get("capturable", False) for group in groups]
        for group in groups:
            group["capturable"] = True
            for p in group["params"]:  # a resumed (or warm-up-free) optimizer's step counts live on the host
                state = self.optimizer.state.get(p)
                if state and "step" in state and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
        try:
            yield
        finally:
            for group, value in zip(groups, saved):
                group["capturable"] = value

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[Callable[..., tuple[torch.Tensor, ...]]]:
        """Run warm-up steps on a side stream, as the guide requires; later eager steps on the current one.
        Yields a function that hands the outputs back to the current stream safely."""
        if self.device.type != "cuda" or self.graph is not None:
            yield lambda *outputs: outputs
            return
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)

        def finish(*outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for t in outputs:
                t.record_stream(main)  # made on the side stream, read on the main one: not reused too early
            return outputs

        with torch.cuda.stream(side):
            yield finish
        main.wait_stream(side)


def graphed_training_step(enabled: bool, *, forward: Step, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          scheduler: object, grad_clip_norm: float | None, device: torch.device, precision: str,
                          accumulate_grad_batches: int, nonfinite_loss: str, world_size: int,
                          compile: bool) -> GraphedStep | None:
    """The Trainer's whole step as a `GraphedStep` when `enabled` (trainer.cuda_graphs), else None. `forward`
    gives a batch's (logits, loss); clipping, when on, is in the graph too (torch's clip makes no host sync)."""
    if not enabled:
        return None
    check_cuda_graphs(device=device, optimizer=optimizer, scheduler=scheduler, precision=precision,
                      world_size=world_size, accumulate_grad_batches=accumulate_grad_batches,
                      nonfinite_loss=nonfinite_loss, compile=compile)

    def step(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = forward(images, targets)
        loss.backward()
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        return logits, loss

    return GraphedStep(step, optimizer, device)
