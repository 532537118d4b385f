"""trainer.cuda_graphs on the CPU: everything about the graphed step except the GPU itself.

`GraphedStep` is given a stand-in for torch.cuda.CUDAGraph. Its capture runs the step once and then undoes it,
as a capture runs nothing. Its replay runs the same step again on the same static input buffers and writes into
the same output tensors, as a graph's kernels do. What this checks is the bookkeeping around the graph:
- the eager warm-up;
- the static buffers;
- the LR a one-cycle schedule changes on every step, which reaches the captured optimizer only through a
  tensor;
- short batches, which run eagerly beside the graph.

tests/test_cuda.py runs the real graph on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, run_train
from torch import nn

from trainer.loop.cuda_graph import GraphedStep, check_cuda_graphs


class StandInGraph:
    """torch.cuda.CUDAGraph's contract on the CPU (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.step = self.outputs = None

    def capture(self, step):
        saved = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict()))
        self.step, self.outputs = step, step()
        self.model.load_state_dict(saved[0])  # a capture runs nothing
        self.optimizer.load_state_dict(saved[1])
        return self.outputs

    def replay(self):
        for p in self.model.parameters():  # the captured backward writes the gradients afresh, it does not add
            p.grad = None
        for static, new in zip(self.outputs, self.step()):
            static.copy_(new)


def batches(n_full: int, batch: int = 8, short: int = 5):
    g = torch.Generator().manual_seed(0)
    sizes = [batch] * n_full + [short]
    return [(torch.randn(b, 12, generator=g), torch.randint(0, 4, (b,), generator=g)) for b in sizes]


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    # foreach=False: the CPU's Adam reads a tensor LR only in its single-tensor form (the GPU's, capturable)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99), foreach=False)
    # One-cycle moves the LR on every step: a graph that kept its captured LR would drift from it.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=40, cycle_momentum=False)
    return model, optimizer, schedule


def step_of(model, optimizer):
    def step(x, y):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return logits, loss
    return step


def eager_training(data, epochs=2):
    model, optimizer, schedule = model_and_optimizer()
    losses = []
    for _ in range(epochs):
        for x, y in data:
            logits, loss = step_of(model, optimizer)(x, y)
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.item())
    return model, losses


def graphed_training(data, epochs=2, follow_schedule=True):
    model, optimizer, schedule = model_and_optimizer()
    graphed = GraphedStep(step_of(model, optimizer), optimizer, torch.device("cpu"), warmup_steps=3,
                          graph_factory=lambda: StandInGraph(model, optimizer))
    if not follow_schedule:
        graphed._follow_schedule = lambda: None
    losses = []
    for _ in range(epochs):
        for x, y in data:
            logits, loss = graphed(x, y)
            assert logits.shape == (len(y), 4)
            schedule.step()
            losses.append(loss.item())
    return model, losses, graphed


def test_the_graphed_step_trains_as_the_eager_loop_does_under_a_one_cycle_schedule():
    data = batches(6)  # 6 full batches and a short one per epoch
    eager, eager_losses = eager_training(data)
    graphed, graphed_losses, step = graphed_training(data)
    assert step.eager_steps == 3 + 2  # the warm-up, then each epoch's short batch
    assert step.replays == 14 - 5
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The check can fail: a graph that keeps the LR it was captured with trains differently.
    stale, _, _ = graphed_training(data, follow_schedule=False)
    assert max((a - b).abs().max().item() for a, b in zip(eager.parameters(), stale.parameters())) > 1e-3


def test_outputs_are_copies_that_the_next_replay_does_not_overwrite():
    data = batches(6)
    model, optimizer, _ = model_and_optimizer()
    graphed = GraphedStep(step_of(model, optimizer), optimizer, torch.device("cpu"), warmup_steps=1,
                          graph_factory=lambda: StandInGraph(model, optimizer))
    first = [graphed(x, y) for x, y in data[:4]]
    kept = [(logits.clone(), loss.clone()) for logits, loss in first]
    graphed(*data[4])
    for (logits, loss), (logits_then, loss_then) in zip(first, kept):
        assert torch.equal(logits, logits_then) and torch.equal(loss, loss_then)


def test_a_short_batch_after_the_capture_keeps_the_graphs_gradient_tensors():
    data = batches(3)
    model, optimizer, _ = model_and_optimizer()
    graphed = GraphedStep(step_of(model, optimizer), optimizer, torch.device("cpu"), warmup_steps=1,
                          graph_factory=lambda: StandInGraph(model, optimizer))
    for x, y in data[:3]:
        graphed(x, y)
    grads = [p.grad for p in model.parameters()]
    reference = copy.deepcopy(model)
    x, y = data[3]  # the short batch: eager, with its own gradient only (not added to the last replay's)
    graphed(x, y)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # zeroed in place, not dropped
    nn.functional.cross_entropy(reference(x), y).backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("change, message", [
    (dict(device=torch.device("cpu")), "needs a CUDA device (trainer.device is cpu)"),
    (dict(optimizer="sgd"), "optimizer=adam or adamw"),
    (dict(scheduler="cycling"), "scheduler.cycle_momentum=false"),
    (dict(precision="fp16"), "use bf16"),
    (dict(accumulate_grad_batches=2), "trainer.accumulate_grad_batches=2"),
    (dict(nonfinite_loss="skip"), "trainer.nonfinite_loss=skip"),
    (dict(world_size=2), "2 processes"),
    (dict(compile=True), "trainer.compile=true"),
])
def test_what_a_graph_cannot_replay_is_refused_in_one_line(change, message):
    model = nn.Linear(2, 2)
    settings = dict(device=torch.device("cuda"), optimizer=torch.optim.Adam(model.parameters()), precision="bf16",
                    accumulate_grad_batches=1, nonfinite_loss="error", world_size=1, compile=False, scheduler=None)
    if change.pop("optimizer", None):
        settings["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    if change.pop("scheduler", None):
        settings["scheduler"] = torch.optim.lr_scheduler.OneCycleLR(settings["optimizer"], max_lr=0.1, total_steps=10)
    settings.update(change)
    with pytest.raises(Exception) as refused:
        check_cuda_graphs(**settings)
    assert message in str(refused.value) and "set trainer.cuda_graphs=false" in str(refused.value)
    assert "\n" not in str(refused.value)
    fine = torch.optim.AdamW(model.parameters())
    check_cuda_graphs(device=torch.device("cuda"), precision="bf16", accumulate_grad_batches=1, nonfinite_loss="error",
                      world_size=1, compile=False, optimizer=fine,
                      scheduler=torch.optim.lr_scheduler.OneCycleLR(fine, max_lr=0.1, total_steps=10,
                                                                    cycle_momentum=False))  # all fine: no error


def test_train_py_on_a_cpu_refuses_cuda_graphs_in_one_line(tiny_root, tmp_path):
    result = run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "model=logistic",
                       "trainer.cuda_graphs=true")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == ("error: trainer.cuda_graphs=true needs a CUDA device (trainer.device is cpu); set "
                        "trainer.cuda_graphs=false")
    assert not any(tmp_path.iterdir())  # nothing left behind
