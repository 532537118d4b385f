"""The real Trainer loop: each scheduler is stepped at its cadence (the logged lr sequence is checked),
gradient clipping bounds the updates."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from data_args import tiny_mnist

import trainer.report.run_report as report_module
from trainer.errors import UserError
from trainer.loop import schedulers
from trainer.loop.options import TrainerOptions
from trainer.loop.trainer import NonFiniteLossError, Trainer
from trainer.report.tracker import Tracker

STEPS_PER_EPOCH, EPOCHS, LR = 4, 4, 0.1


class RecordingLogger(Tracker):
    def __init__(self, log_dir, purge_step=None):
        super().__init__(log_dir, purge_step)
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.pictures: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.histogram_steps: list[int] = []

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.scalars.setdefault(k, []).append((step, v))

    def log_text(self, tag, text, step=0):
        pass

    def log_images(self, tag, images, step=0):
        self.images = images

    def log_image(self, tag, image, step):
        self.pictures.setdefault(tag, []).append((step, image))

    def log_histograms(self, model, step, grad_scale=1.0):
        assert all(p.grad is not None for p in model.parameters())  # the epoch's last gradients, not cleared yet
        self.histogram_steps.append(step)

    def log_confusion_matrix(self, tag, confusion, classes, step):
        pass

    def log_graph(self, model, example):
        pass

    def flush(self):
        pass

    def close(self):
        pass


OPTIONS = dict(precision="fp32", compile=False, channels_last=False, accumulate_grad_batches=1, num_threads=None,
               limit_train_batches=None, limit_eval_batches=None, checkpoint_every_n_steps=None, nonfinite_loss="error",
               early_stopping_patience=None, early_stopping_min_delta=0.0, log_every_n_steps=1,
               misclassified_images=0, histogram_every_n_epochs=None, log_graph=False, ema_decay=None, ema_warmup=False,
               cuda_graphs=False, top_k=5, full_val_metrics=False)


def linear():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def fit(*args, **kwargs):
    """Train EPOCHS x STEPS_PER_EPOCH steps; return the trainer and its recorded TensorBoard scalars."""
    trainer, scalars = build(*args, **kwargs)
    trainer.fit()
    return trainer, scalars


def build(tiny_root, tmp_path, make_schedule, optimizer="sgd", monitor="val/acc", grad_clip_norm=None, batch_size=125,
          make_model=linear, loss_fn=None, **options):
    torch.manual_seed(0)
    data = tiny_mnist(tiny_root, batch_size=batch_size, eval_batch_size=100, val_size=100, mean=0.13, std=0.31)
    model = make_model()
    opt = (torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9 if grad_clip_norm is None else 0.0)
           if optimizer == "sgd" else torch.optim.Adagrad(model.parameters(), lr=LR))
    logs, options = [], {**OPTIONS, **options}
    if (tmp_path / "checkpoints").exists():  # a test's second run: a directory of its own (a run refuses another's)
        tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    settings = dict(max_epochs=EPOCHS, grad_clip_norm=grad_clip_norm, monitor=monitor,
                    mode="max" if monitor != "val/loss" else "min", checkpoint_dir="checkpoints", resume=None,
                    deterministic=False, **options)
    trainer = Trainer(model=model, loss_fn=loss_fn or torch.nn.CrossEntropyLoss(), optimizer=opt,
                      scheduler=make_schedule, data=data,
                      logger=lambda **kw: logs.append(RecordingLogger(**kw)) or logs[-1], run_dir=tmp_path,
                      device=torch.device("cpu"), options=TrainerOptions.from_settings(settings))
    return trainer, logs[0].scalars


def lr_per_step(*args, **kwargs):
    """The lr each step trained with."""
    return [lr for _, lr in fit(*args, **kwargs)[1]["lr"]]


def test_none_is_constant(tiny_root, tmp_path):
    assert lr_per_step(tiny_root, tmp_path, schedulers.none) == [LR] * 16


def test_step_is_per_epoch(tiny_root, tmp_path):
    lrs = lr_per_step(tiny_root, tmp_path, lambda o, **kw: schedulers.step(o, step_size=2, gamma=0.5, **kw))
    assert lrs == pytest.approx([LR] * 8 + [LR / 2] * 8)


def test_multistep_and_exponential_are_per_epoch(tiny_root, tmp_path):
    lrs = lr_per_step(tiny_root, tmp_path, lambda o, **kw: schedulers.multistep(o, milestones=[1, 3], gamma=0.1, **kw))
    assert lrs == pytest.approx([LR] * 4 + [LR / 10] * 8 + [LR / 100] * 4)
    lrs = lr_per_step(tiny_root, tmp_path, lambda o, **kw: schedulers.exponential(o, gamma=0.5, **kw))
    assert lrs == pytest.approx([LR * 0.5 ** (i // 4) for i in range(16)])


def test_cosine_is_per_step_over_the_run(tiny_root, tmp_path):
    lrs = lr_per_step(tiny_root, tmp_path, lambda o, **kw: schedulers.cosine(o, eta_min=0.0, **kw))
    assert lrs == pytest.approx([LR * (1 + math.cos(math.pi * i / 16)) / 2 for i in range(16)], abs=1e-9)


def test_onecycle_is_per_step_and_peaks_at_max_lr(tiny_root, tmp_path):
    make = lambda o, **kw: schedulers.onecycle(o, max_lr=1.0, pct_start=0.25, div_factor=10.0,  # noqa: E731
                                               final_div_factor=100.0, anneal_strategy="linear", cycle_momentum=True,
                                               **kw)
    lrs = lr_per_step(tiny_root, tmp_path, make)
    assert len(set(lrs)) == 16 and lrs[0] == pytest.approx(1.0 / 10)  # starts at max_lr / div_factor
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 3  # peak at step pct_start * 16 - 1
    assert lrs[-1] == pytest.approx(1.0 / 10 / 100) == min(lrs)  # ends at initial / final_div_factor
    assert lr_per_step(tiny_root, tmp_path, make, optimizer="adagrad")[3] == pytest.approx(1.0)  # no momentum: ok


def test_warmup_is_linear_per_step(tiny_root, tmp_path):
    lrs = lr_per_step(tiny_root, tmp_path, lambda o, **kw: schedulers.warmup(o, warmup_steps=5, **kw))
    assert lrs == pytest.approx([LR * min(1, (i + 1) / 5) for i in range(16)])


def test_plateau_steps_on_the_monitored_metric(tiny_root, tmp_path):
    # val/loss in "max" mode never improves after epoch 1: with patience 1 the LR drops after epoch 3.
    make = lambda o, **kw: schedulers.plateau(o, mode="max", factor=0.5, patience=1, threshold=0.0,  # noqa: E731
                                              min_lr=0.0, **kw)
    lrs = lr_per_step(tiny_root, tmp_path, make, monitor="val/loss")
    assert lrs[:12] == [LR] * 12 and lrs[12:] == pytest.approx([LR / 2] * 4)


def test_grad_clip_norm_bounds_every_update(tiny_root, tmp_path):
    torch.manual_seed(0)
    start = torch.nn.Linear(784, 10).state_dict()  # what fit() initialises after seeding the same way
    clip = 1e-3
    trainer, _ = fit(tiny_root, tmp_path, schedulers.none, grad_clip_norm=clip)
    moved = torch.cat([(p - start[k.split(".", 1)[1]]).flatten() for k, p in trainer.model.state_dict().items()])
    # plain SGD: each step moves the weights by lr * clipped gradient, so at most lr * clip in norm
    assert 0 < moved.norm() <= EPOCHS * STEPS_PER_EPOCH * LR * clip * (1 + 1e-5)
    _, scalars = fit(tiny_root, tmp_path, schedulers.none)
    assert scalars["val/acc"][-1][1] > 0.5  # without clipping the same run learns


def test_gradient_accumulation_equals_the_larger_batch(tiny_root, tmp_path):
    big, _ = fit(tiny_root, tmp_path, schedulers.none, batch_size=100)
    acc, _ = fit(tiny_root, tmp_path, schedulers.none, batch_size=50, accumulate_grad_batches=2)
    assert big.progress.global_step == acc.progress.global_step == EPOCHS * 5
    for k, v in big.model.state_dict().items():
        assert torch.allclose(v, acc.model.state_dict()[k], atol=1e-6), k


def test_accumulation_and_batch_limit_set_the_schedule_length(tiny_root, tmp_path):
    make = lambda o, **kw: schedulers.onecycle(o, max_lr=1.0, pct_start=0.3, div_factor=10.0,  # noqa: E731
                                               final_div_factor=100.0, anneal_strategy="linear", cycle_momentum=True,
                                               **kw)
    trainer, scalars = fit(tiny_root, tmp_path, make, batch_size=25, limit_train_batches=7, accumulate_grad_batches=3)
    assert trainer.steps_per_epoch == 3 and trainer.progress.global_step == EPOCHS * 3  # ceil(7 / 3) steps an epoch
    lrs = [lr for _, lr in scalars["lr"]]
    assert lrs[-1] == pytest.approx(1.0 / 10 / 100)  # the one-cycle ends exactly at the run's last step


def test_bf16_autocast_trains_and_keeps_fp32_weights(tiny_root, tmp_path):
    trainer, scalars = fit(tiny_root, tmp_path, schedulers.none, precision="bf16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert scalars["val/acc"][-1][1] > 0.5


def test_num_threads(tiny_root, tmp_path):
    before = torch.get_num_threads()
    try:
        fit(tiny_root, tmp_path, schedulers.none, num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def small_cnn():
    from trainer.models.cnn import CNN
    return CNN((1, 28, 28), 10, channels=[4, 8], kernel_sizes=[3, 3], hidden=16, dropout=0.0, batch_norm=True,
               activation="ReLU", convs_per_stage=1, pool_first=False)


def test_channels_last_matches_contiguous(tiny_root, tmp_path):
    nchw, _ = fit(tiny_root, tmp_path, schedulers.none, make_model=small_cnn)
    nhwc, _ = fit(tiny_root, tmp_path, schedulers.none, make_model=small_cnn, channels_last=True)
    assert nhwc.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    # The same training up to float rounding: the layouts run different convolution kernels, whose sums differ in
    # order. Measured over these 16 steps: at most 2.3e-5 with two threads, 1.1e-3 (a batch-norm running_var) with
    # one (pytest-xdist workers run one). A layout bug (a wrong permute) moves weights by about 0.1.
    for k, v in nchw.model.state_dict().items():
        assert torch.allclose(v.float(), nhwc.model.state_dict()[k].float(), rtol=1e-2, atol=2e-3), k


@pytest.mark.slow
def test_compiled_model_checkpoints_load_uncompiled(tiny_root, tmp_path):
    trainer, scalars = fit(tiny_root, tmp_path, schedulers.none, make_model=small_cnn, compile=True)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)
    fresh = small_cnn()
    fresh.load_state_dict(state)  # strict: every key matches an uncompiled model
    fresh.eval()
    trainer.net.eval()
    x = trainer.data.test.transform(trainer.data.test.raw(slice(8))[0])
    with torch.no_grad():
        assert torch.allclose(fresh(x), trainer.net(x), atol=1e-4)


def test_buffered_metrics_equal_per_batch_updates_and_survive_a_state_dict_roundtrip(tmp_path):
    from trainer.loop.metrics import EpochMetrics
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand((), generator=g), torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g))
               for n in (32, 32, 7, 32)]
    per_batch, buffered, resumed = (EpochMetrics(10, torch.device("cpu"), top_k=3) for _ in range(3))
    for loss, logits, targets in batches:
        per_batch.add(loss, logits, targets)
        per_batch.flush()
        buffered.add(loss, logits, targets)
    # stop after 3 batches (one flushed, two still buffered), save, load into fresh metrics, add the rest
    stopped = EpochMetrics(10, torch.device("cpu"), top_k=3)  # its top-k hits of the buffered batches go along
    stopped.add(*batches[0])
    stopped.flush()
    for b in batches[1:3]:
        stopped.add(*b)
    torch.save(stopped.state_dict(), tmp_path / "m.pt")
    resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    resumed.add(*batches[3])
    a, b, c = per_batch.compute("x"), buffered.compute("x"), resumed.compute("x")
    assert a == pytest.approx(b) and a == pytest.approx(c) and "x/acc_top3" in a
    weighted = sum(float(loss) * len(t) for loss, _, t in batches) / 103  # by samples
    assert a["x/loss"] == pytest.approx(weighted)


class NaNOnBatch(torch.nn.Module):
    """Cross-entropy, except that training batch number `at` (1-based, over the run) gets a NaN loss."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, targets):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if torch.is_grad_enabled():  # training, not evaluation
            self.calls += 1
            if self.calls == self.at:
                return loss * float("nan")
        return loss


@pytest.mark.parametrize("log_every", [1, 3])
def test_nonfinite_loss_stops_naming_the_batch_and_keeps_the_checkpoints(tiny_root, tmp_path, log_every):
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, loss_fn=NaNOnBatch(at=STEPS_PER_EPOCH + 2),
                       log_every_n_steps=log_every)
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 2, batch 2 \(optimizer step 6\)"):
        trainer.fit()
    for name in ("last.pt", "best.pt"):  # epoch 1's, untouched by the diverged model
        assert torch.load(tmp_path / "checkpoints" / name, weights_only=True)["epoch"] == 1


def test_nonfinite_loss_skip_drops_that_batch_only(tiny_root, tmp_path):
    trainer, scalars = fit(tiny_root, tmp_path, schedulers.none, loss_fn=NaNOnBatch(at=STEPS_PER_EPOCH + 2),
                           nonfinite_loss="skip")
    assert trainer.progress.skipped_batches == 1 and trainer.progress.global_step == EPOCHS * STEPS_PER_EPOCH
    assert [v for _, v in scalars["train/skipped_batches"]] == [0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert math.isfinite(scalars["train/loss_epoch"][1][1]) and scalars["val/acc"][-1][1] > 0.5


def test_nonfinite_weights_are_never_checkpointed(tiny_root, tmp_path):
    trainer, _ = fit(tiny_root, tmp_path, schedulers.none)
    before = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    with torch.no_grad():
        trainer.model[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(1.weight\)"):
        trainer.save_checkpoint("best.pt")
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == before


@pytest.mark.parametrize("patience, min_delta, epochs_run, best_epoch", [
    (2, 0.0, 4, 3),  # 0.4 is one epoch without improvement, 0.51 resets the count, 0.3 is one again
    (1, 0.0, 2, 1),  # 0.4 exhausts a patience of 1
    (2, 0.5, 3, 3),  # 0.51 is a new best (best.pt) but not by more than 0.5: two epochs without improvement
])
def test_early_stopping_counts_epochs_without_improvement(tiny_root, tmp_path, monkeypatch, patience, min_delta,
                                                          epochs_run, best_epoch):
    scripted = iter([{"val/loss": 1.0, "val/acc": a, "val/f1": a} for a in (0.5, 0.4, 0.51, 0.3)])
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, early_stopping_patience=patience,
                       early_stopping_min_delta=min_delta)
    monkeypatch.setattr(trainer, "evaluate", lambda loader, prefix: next(scripted))
    trainer.fit()
    assert (trainer.progress.epoch, trainer.progress.best_epoch) == (epochs_run, best_epoch)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epochs_without_improvement"] == trainer.progress.epochs_without_improvement


def test_limit_eval_batches(tiny_root, tmp_path):
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, limit_eval_batches=1)
    measured = trainer.eval_metrics["test"]
    seen, add = [], measured.add
    measured.add = lambda loss, logits, targets: seen.append(len(targets)) or add(loss, logits, targets)
    trainer.evaluate(trainer.data.test, "test")
    assert seen == [100]  # one batch of eval_batch_size, not the 200 test images


def test_momentum_is_logged_with_the_value_each_step_used(tiny_root, tmp_path):
    # one-cycle cycles SGD's momentum against the LR: from max_momentum 0.95 down to 0.85 at the LR peak and back
    trainer, scalars = fit(tiny_root, tmp_path, lambda opt, **kw: schedulers.onecycle(
        opt, max_lr=LR, pct_start=0.25, div_factor=25.0, final_div_factor=1e4, anneal_strategy="cos",
        cycle_momentum=True, **kw))
    momentum = [m for _, m in scalars["momentum"]]
    lr = [v for _, v in scalars["lr"]]
    assert len(momentum) == EPOCHS * STEPS_PER_EPOCH
    assert momentum[0] == pytest.approx(0.95) and momentum[lr.index(max(lr))] == pytest.approx(0.85)
    assert trainer.logger.images.shape == (64, 1, 28, 28)  # the input grid: raw uint8 training images


def test_each_validation_logs_its_confusion_matrix_and_first_misclassified_images(tiny_root, tmp_path, monkeypatch):
    grids = []  # (images, captions) of each misclassified grid, in the order logged
    draw = report_module.labelled_grid
    monkeypatch.setattr(report_module, "labelled_grid", lambda images, captions: grids.append((images, captions))
                        or draw(images, captions))
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, misclassified_images=5)
    # The tiny dataset is learnt perfectly, so mislabel some validation images: the model will "miss" them.
    labels = trainer.data.val.labels  # shared with train; val.indices are never trained on
    mislabelled = trainer.data.val.indices[[3, 7, 20, 21, 50, 60, 90]]
    labels[mislabelled] = (labels[mislabelled] + 1) % 10
    trainer.fit()
    pictures = trainer.logger.pictures
    assert [step for step, _ in pictures["val/confusion_matrix"]] == [4, 8, 12, 16]
    assert all(image.dtype == torch.uint8 and image.shape[0] == 3 for _, image in pictures["val/confusion_matrix"])
    assert [step for step, _ in pictures["val/misclassified"]] == [4, 8, 12, 16]

    # the last grid holds exactly the first 5 validation images the final model gets wrong, captioned correctly
    images, labels = trainer.data.val.raw()
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(trainer.data.val.transform(images)).argmax(1)
    wrong = (predicted != labels).nonzero().squeeze(1)[:5]
    assert wrong.tolist() == [3, 7, 20, 21, 50] and len(grids) == 4
    shown, captions = grids[-1]
    assert torch.equal(shown, images[wrong])
    assert captions == [(f"pred {p}", f"true {t}") for p, t in zip(predicted[wrong].tolist(), labels[wrong].tolist())]


@pytest.mark.parametrize("every, steps", [(None, []), (1, [4, 8, 12, 16]), (2, [8, 16])])
def test_histograms_every_n_epochs_with_the_epochs_last_gradients(tiny_root, tmp_path, every, steps):
    trainer, _ = fit(tiny_root, tmp_path, schedulers.none, histogram_every_n_epochs=every)
    assert trainer.logger.histogram_steps == steps  # RecordingLogger checks the gradients were still there


def test_ema_is_the_average_of_every_step_and_is_what_validation_test_and_best_pt_use(tiny_root, tmp_path,
                                                                                      monkeypatch):
    """trainer.ema_decay: after each optimizer step the average moves towards the weights (decay 0.5, warm-up
    off: ema = 0.5 ema + 0.5 w, starting at the first step's weights); evaluation runs on the average."""
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, ema_decay=0.5, ema_warmup=False)
    expected, step = {}, trainer._optimizer_step

    def stepping():
        used = step()
        w = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        for k, v in w.items():
            expected[k] = v if k not in expected else 0.5 * expected[k] + 0.5 * v
        return used

    monkeypatch.setattr(trainer, "_optimizer_step", stepping)
    evaluated = []
    forward = trainer._forward
    monkeypatch.setattr(trainer, "_forward", lambda images, targets, net=None: evaluated.append(net) or
                        forward(images, targets, net))
    trainer.fit()
    average = trainer.ema.module.state_dict()
    assert all(torch.allclose(average[k], expected[k], atol=1e-6) for k in expected)
    assert not all(torch.equal(average[k], v) for k, v in trainer.model.state_dict().items())  # not the weights
    assert {id(n) for n in evaluated if n is not trainer.train_net} == {id(trainer.ema.module)}  # val: the average
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(last["model"][k], average[k]) for k in average)  # "model": what eval/predict/export load
    assert all(torch.equal(last["train_model"][k], v) for k, v in trainer.model.state_dict().items())
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    test = trainer.test()  # evaluates best.pt's "model", the average as it was at the best epoch
    reference = linear()
    reference.load_state_dict(best["model"])
    logits = reference(trainer.data.test.transform(trainer.data.test.raw(slice(None))[0]))  # (N, 10)
    acc = (logits.argmax(1) == trainer.data.test.raw(slice(None))[1]).float().mean()
    assert test["test/acc"] == pytest.approx(float(acc), abs=1e-6)


def test_ema_warmup_starts_fast(tiny_root, tmp_path):
    """With the warm-up the n-th update uses min(decay, (1 + n) / (10 + n)): 2/11 for the second step."""
    trainer, _ = build(tiny_root, tmp_path, schedulers.none, ema_decay=0.999, ema_warmup=True)
    first = None
    for step in range(2):
        images, targets = next(iter(trainer.data.train))
        _, loss = trainer._forward(images, targets, trainer.train_net)
        loss.backward()
        trainer._optimizer_step()
        if step == 0:
            first = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    d = 2 / 11
    for k, v in trainer.model.state_dict().items():
        assert torch.allclose(trainer.ema.module.state_dict()[k], d * first[k] + (1 - d) * v, atol=1e-6)


@pytest.mark.parametrize("decay", [1.0, 0.0, -0.5, 2, "0.9"])
def test_ema_decay_outside_0_1_is_refused(tiny_root, tmp_path, decay):
    says = rf"trainer.ema_decay={decay!r}: must be null \(off\) or a number strictly between 0 and 1"
    with pytest.raises(UserError, match=says):
        build(tiny_root, tmp_path, schedulers.none, ema_decay=decay, ema_warmup=False)


def test_a_new_run_in_a_directory_that_holds_a_run_is_refused(tiny_root, tmp_path):
    """From Python a run directory is the caller's; given one twice, the second run would overwrite the first's
    best.pt, last.pt and metrics.json. It is refused, and the first run's files are untouched."""
    trainer, _ = fit(tiny_root, tmp_path, schedulers.none)
    trainer.test()
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    data = tiny_mnist(tiny_root, batch_size=125, eval_batch_size=100, val_size=100, mean=0.13, std=0.31)
    model = linear()
    settings = dict(OPTIONS, max_epochs=EPOCHS, grad_clip_norm=None, monitor="val/acc", mode="max",
                    checkpoint_dir="checkpoints", resume=None, deterministic=False)
    with pytest.raises(UserError, match=rf"run directory {tmp_path} already holds a run .*checkpoints/last.pt"):
        Trainer(model=model, loss_fn=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                scheduler=schedulers.none, data=data, logger=RecordingLogger, run_dir=tmp_path, device="cpu",
                options=TrainerOptions.from_settings(settings))
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
