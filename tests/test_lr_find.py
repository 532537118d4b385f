"""The LR range test (src/trainer/loop/lr_find.py, scripts/lr_find.py): an exponential sweep on a copy of the model,
smoothed, stopped at divergence, with the documented suggestion rule."""

import json
import math

import pytest
import torch
from conftest import TINY, run_train
from data_args import tiny_mnist

from trainer.errors import UserError
from trainer.loop.lr_find import RangeTest, divisor_for, lr_range_test


def setup(tiny_root, optimizer="sgd"):
    torch.manual_seed(0)
    data = tiny_mnist(tiny_root, batch_size=50, eval_batch_size=100, val_size=100, mean=0.13, std=0.31)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    return data, model, opt, lambda: iter(data.train)


def test_sweeps_exponentially_on_a_copy_and_suggests_a_fifth_of_the_minimum_by_default(tiny_root):
    data, model, opt, batches = setup(tiny_root)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_range_test(model, torch.nn.CrossEntropyLoss(), opt, batches, start_lr=1e-5, end_lr=1e-1,
                           num_steps=40, smoothing=0.9, diverge=4.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model given is untouched
    assert opt.state == {} and opt.param_groups[0]["lr"] == 0.1  # and so is its optimizer
    assert not result.diverged and len(result.lrs) == 40  # 40 steps over 10 batches an epoch: 4 passes
    assert result.lrs[0] == pytest.approx(1e-5) and result.lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([10 ** (4 / 39)] * 39)  # exponential: the same factor every step
    average, smoothed = 0.0, []
    for i, loss in enumerate(result.losses):  # the bias-corrected moving average
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average / (1 - 0.9 ** (i + 1)))
    assert result.smoothed == pytest.approx(smoothed)
    assert result.smoothed[-1] < result.smoothed[0]  # it learned
    best = min(range(40), key=lambda i: result.smoothed[i])
    assert result.suggestion == pytest.approx(result.lrs[best] / 5)


def test_the_rule_follows_the_schedule():
    assert divisor_for("trainer.loop.schedulers.onecycle") == 2.0  # optimizer.lr is the peak of a warm-up
    for constant in ("trainer.loop.schedulers.none", "trainer.loop.schedulers.cosine", "mine.Schedule"):
        assert divisor_for(constant) == 5.0
    result = RangeTest(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.0, 3.0], smoothed=[2.0, 1.0, 3.0])
    assert result.lowest_lr == 1e-2 and result.suggestion == pytest.approx(2e-3)
    result.divisor = divisor_for("trainer.loop.schedulers.onecycle")
    assert result.suggestion == pytest.approx(5e-3)


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad,
                                       torch.optim.Adadelta])
def test_every_optimizer_option_is_copied_with_its_settings(optimizer):
    """The sweep's optimizer is a new one of the same class and settings: AdamW's defaults hold a key its
    constructor refuses (decoupled_weight_decay), which failed every `optimizer=adamw` preset with a traceback."""
    model = torch.nn.Linear(4, 2)
    opt = optimizer(model.parameters(), lr=0.01, weight_decay=0.05)
    seen, state = [], {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}  # Adagrad has some
    loss = lambda out, t: seen.append(out) or out.pow(2).mean()  # noqa: E731
    lr_range_test(model, loss, opt, lambda: iter([(torch.ones(3, 4), None)] * 10), start_lr=1e-4, end_lr=1e-2,
                  num_steps=10, smoothing=0.5, diverge=4.0)
    assert len(seen) == 10 and opt.param_groups[0]["lr"] == 0.01  # ran, on a copy: the optimizer given is as it was
    assert all(torch.equal(state[k][n], v) for k, s in opt.state.items() for n, v in s.items())


def test_stops_when_the_loss_diverges():
    """w -> (w - t)^2, t alternating 0.5 and 1.5, with SGD: the period-2 targets swing w ever wider as the LR nears
    1, where plain SGD on this loss turns unstable."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)  # at the mean of the targets: the loss stays 0.25 while the LR is small
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = lambda: iter([(torch.ones(1, 1), torch.tensor([[t]])) for t in (0.5, 1.5)] * 500)  # noqa: E731
    result = lr_range_test(model, lambda out, t: ((out - t) ** 2).mean(), opt, batches, start_lr=1e-3, end_lr=1e3,
                           num_steps=200, smoothing=0.5, diverge=4.0)
    assert result.diverged and result.smoothed[-1] > 4 * min(result.smoothed) and all(map(math.isfinite, result.losses))
    assert 0.3 < result.lrs[-1] < 3.0  # it climbs as the LR nears 1, where SGD turns unstable, and ends soon after
    assert result.suggestion < result.lrs[-1] / 3


def test_a_non_finite_loss_ends_the_sweep(tiny_root):
    data, model, opt, batches = setup(tiny_root)
    result = lr_range_test(model, torch.nn.CrossEntropyLoss(), opt, batches, start_lr=1e-4, end_lr=1e30,
                           num_steps=200, smoothing=0.5, diverge=1e30)
    assert result.diverged and len(result.lrs) < 200 and all(map(math.isfinite, result.smoothed))


@pytest.mark.parametrize("settings, says", [
    (dict(start_lr=1.0, end_lr=0.1), "need 0 < start_lr < end_lr"),
    (dict(num_steps=3), "lr_find.num_steps=3: must be an integer >= 10"),
    (dict(smoothing=1.0), "lr_find.smoothing=1.0: must be a number in [0, 1)"),
    (dict(smoothing="abc"), "lr_find.smoothing='abc': must be a number in [0, 1)"),
    (dict(diverge=1), "lr_find.diverge=1: must be a number > 1"),
    (dict(num_steps=2.5), "lr_find.num_steps=2.5: must be an integer >= 10"),
])
def test_bad_settings_are_refused(tiny_root, settings, says):
    data, model, opt, batches = setup(tiny_root)
    args = {**dict(start_lr=1e-5, end_lr=1.0, num_steps=20, smoothing=0.9, diverge=4.0), **settings}
    with pytest.raises(UserError, match=re_escape(says)):
        lr_range_test(model, torch.nn.CrossEntropyLoss(), opt, batches, **args)


def re_escape(text):
    import re
    return re.escape(text)


def test_the_script_writes_its_curve_and_prints_the_override(tiny_root, tmp_path):
    out = tmp_path / "out"
    result = run_train(*TINY, f"dataset.root={tiny_root}", "model=mlp", "model.hidden_sizes=[32]", "optimizer=sgd",
                       "lr_find.num_steps=60", f"output_root={out}", script="scripts/lr_find.py")
    assert result.returncode == 0, result.stderr
    found = float(result.stdout.split("suggested learning rate: ")[1].split()[0])
    assert "  python train.py " in result.stdout and result.stdout.rstrip().endswith(f"optimizer.lr={found:.2e}")
    assert "lr_find.num_steps" not in result.stdout.splitlines()[-1]  # the sweep's own settings are not train.py's
    (run_dir,) = (out / "lr_find").glob("*/*")
    saved = json.loads((run_dir / "lr_find.json").read_text())
    assert saved["suggestion"] == pytest.approx(found, rel=1e-2) and len(saved["lr"]) == len(saved["loss"]) <= 60
    # the default one-cycle peaks at optimizer.lr after a warm-up: half the lowest point's LR
    assert saved["divisor"] == 2 and saved["suggestion"] == pytest.approx(saved["lowest_lr"] / 2)
    assert "(half the LR at the smoothed loss's minimum: the one-cycle schedule warms up to it" in result.stdout
    assert (run_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"lr_find/loss", "lr_find/smoothed_loss", "lr_find/lr"} <= set(events.Tags()["scalars"])
    assert "lr_find/curve" in events.Tags()["images"]


@pytest.mark.parametrize("bad, says", [
    ("lr_find.num_steps=2.5", "error: lr_find.num_steps=2.5: must be an integer"),
    ("lr_find.num_steps=3", "error: lr_find.num_steps=3: must be an integer >= 10"),
    ("lr_find.smoothing=abc", "error: lr_find.smoothing=abc: must be a number"),
    # a setting train.py refuses is refused here too, so the printed train.py command is one train.py takes
    ("trainer.ema_decay=2", "error: trainer.ema_decay=2.0: must be null (off) or a number strictly between 0 and 1, "
                            "e.g. 0.999"),
    ("scheduler.cycle_momentum=no", "error: scheduler.cycle_momentum=no: must be true or false"),
])
def test_the_script_refuses_a_bad_setting_in_one_line_and_leaves_nothing(tiny_root, tmp_path, bad, says):
    out = tmp_path / "out"
    result = run_train(*TINY, f"dataset.root={tiny_root}", "model=mlp", bad, f"output_root={out}",
                       script="scripts/lr_find.py")
    assert result.returncode == 1 and result.stderr.strip() == says and not result.stdout.strip(), result
    assert not (out / "lr_find").exists() or not list((out / "lr_find").rglob("*.log"))
