"""Every option of every group composes, instantiates and trains a few steps, with every pair of options of
any two groups together (`--full-grid`: every combination)."""

import functools
import itertools

import pytest
import torch
from conftest import MLP, REPO, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.cli import train
from trainer.cli.config import build
from trainer.loop.trainer import Trainer
from trainer.report.logger import TensorBoardLogger

GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "trainer", "task", "logger", "callbacks", "metrics")
LISTED = ("logger", "callbacks", "metrics")  # a run picks several: option x is the node <group>.x
OPTIONS = {g: sorted(p.stem for p in (REPO / "configs" / g).glob("*.yaml")) for g in GROUPS}
CLASSIFICATION_LOSSES = ["bce", "cross_entropy", "mse", "multi_margin", "nll"]


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_issue_options_exist():
    assert OPTIONS["dataset"] == ["cifar10", "cifar100", "custom", "emnist", "fashion_mnist", "image_folder", "kmnist",
                                  "mnist", "tensors", "torchvision"]
    assert OPTIONS["model"] == ["cnn", "custom", "logistic", "mlp", "torchvision"]
    assert OPTIONS["loss"] == sorted([*CLASSIFICATION_LOSSES, "l1", "huber", "poisson_nll", "triplet",
                                      "hinge_embedding", "contrastive"])
    assert OPTIONS["task"] == ["classification", "embedding", "multilabel", "regression"]
    assert OPTIONS["optimizer"] == ["adadelta", "adagrad", "adam", "adamw", "rmsprop", "sgd"]
    assert OPTIONS["scheduler"] == ["cosine", "exponential", "multistep", "none", "onecycle", "plateau", "step",
                                    "warmup"]


# The options that need a value only the user has: where their data is, or which class of theirs.
REQUIRED = {("dataset", "image_folder"): {"dataset.path"}, ("dataset", "tensors"): {"dataset.path"},
            ("dataset", "torchvision"): {"dataset.name"}, ("dataset", "custom"): {"dataset._target_"},
            ("model", "custom"): {"model._target_"}}


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in OPTIONS[g]])
def test_every_option_composes_and_every_value_is_set(group, option):
    cfg = config(f"{group}={option}")
    assert OmegaConf.missing_keys(cfg) == REQUIRED.get((group, option), set())  # no other ??? anywhere
    if not OmegaConf.missing_keys(cfg):
        node = cfg[group][option] if group in LISTED else cfg[group]
        assert group == "trainer" or node._target_  # train.py builds the Trainer from its settings
        OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves


def test_typo_in_an_override_fails():
    with pytest.raises(Exception, match="max_epoch"):
        config("trainer.max_epoch=3")


# The built-in small models; model=torchvision and model=custom are trained in tests/test_open_data.py. The losses
# of single-label classification, the default task; the other tasks' are trained in tests/test_tasks.py.
FACTORS = (["cnn", "logistic", "mlp"], CLASSIFICATION_LOSSES, OPTIONS["optimizer"], OPTIONS["scheduler"])
FULL_GRID = list(itertools.product(*FACTORS))


def all_pairs(factors: tuple[list[str], ...]) -> list[tuple[str, ...]]:
    """Rows in which every pair of options of any two groups appears at least once (a covering array built
    greedily: each row is the candidate that covers the most pairs not yet covered). The options interact in
    pairs (optimizer x scheduler: momentum cycling; model x loss: output shape), so this finds what the full
    product would, in 48 rows instead of 576."""
    def pairs(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}

    uncovered = set().union(*(pairs(row) for row in itertools.product(*factors)))
    rows = []
    while uncovered:
        best = max(itertools.product(*factors), key=lambda row: len(pairs(row) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    return rows


PAIRS = all_pairs(FACTORS)


def test_the_pairwise_rows_cover_every_pair_of_options():
    assert len(PAIRS) == 48  # the least possible: optimizer x scheduler alone has 6 x 8 pairs
    for (i, a), (j, b) in itertools.combinations(enumerate(FACTORS), 2):
        assert {(row[i], row[j]) for row in PAIRS} == set(itertools.product(a, b))


def pytest_generate_tests(metafunc):
    """`pytest --full-grid` trains every combination (576) instead of the pairwise rows."""
    if "scheduler" in metafunc.fixturenames and "model" in metafunc.fixturenames:
        combos = FULL_GRID if metafunc.config.getoption("full_grid") else PAIRS
        metafunc.parametrize("model, loss, optimizer, scheduler", combos, ids=["-".join(c) for c in combos])


@pytest.fixture(scope="module")
def combo_root(tmp_path_factory):
    from conftest import make_tiny_dataset
    return make_tiny_dataset(tmp_path_factory.mktemp("combo"), n_train=228, n_test=20)  # 4 steps an epoch


@functools.lru_cache(maxsize=None)
def option_node(group: str, option: str) -> dict:
    return OmegaConf.to_container(config(f"{group}={option}")[group], resolve=False)


# Small widths: what the grid tests is how the options work together, which does not depend on the layer sizes.
SMALL_MODELS = ("model.hidden_sizes=[32]", "model.channels=[4,8]", "model.hidden=16")


@functools.lru_cache(maxsize=None)
def base_node(root: str) -> dict:
    return OmegaConf.to_container(config(*TINY, f"dataset.root={root}", *GRID_BASE), resolve=False)


# The graph, histograms and misclassified pictures do not depend on these options (tests/test_figures.py and
# tests/test_train_cli.py check them), and cost most of a combination's time.
GRID_BASE = ("dataset.eval_batch_size=64", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
             "trainer.log_graph=false", "trainer.histogram_every_n_epochs=null", "trainer.misclassified_images=0")


def combination(root, **choices: str):
    """The config `compose` gives for these choices, assembled from per-option nodes (groups are independent;
    cross-group interpolations stay unresolved until use), because composing each row takes a quarter second."""
    cfg = OmegaConf.create({**base_node(str(root)), **{g: option_node(g, o) for g, o in choices.items()}})
    OmegaConf.set_struct(cfg, True)
    return cfg


def small(cfg):
    """`cfg` with the model's widths shrunk where its option has them."""
    for key in SMALL_MODELS:
        name, value = key.split("=")
        if OmegaConf.select(cfg, name, default=None) is not None:
            OmegaConf.update(cfg, name, OmegaConf.create(f"v: {value}").v)
    return cfg


def test_assembled_combination_equals_composed(combo_root):
    choices = dict(model="mlp", loss="nll", optimizer="sgd", scheduler="plateau")
    composed = config(*[f"{g}={o}" for g, o in choices.items()], *TINY, f"dataset.root={combo_root}", *GRID_BASE)
    assert OmegaConf.to_container(combination(combo_root, **choices), resolve=True) == \
        OmegaConf.to_container(composed, resolve=True)


def expected_lrs(cfg, val_metrics: list[float]) -> list[float]:
    """The LR of each of the run's 8 optimizer steps, from the configured optimizer and schedule alone (no
    Trainer): a stand-in parameter, 4 steps an epoch, the epoch schedules stepped on the logged val metric."""
    optimizer = build(cfg.optimizer, params=[torch.nn.Parameter(torch.zeros(1))])
    schedule = build(cfg.scheduler, _partial_=True)(optimizer, steps_per_epoch=4, max_epochs=2)
    lrs = []
    for epoch in range(2):
        for _ in range(4):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # no gradient: changes nothing, but the scheduler expects a step before its own
            schedule.after_batch()
        schedule.after_epoch(val_metrics[epoch])
    return lrs


def test_every_combination_trains_a_few_steps(combo_root, tmp_path, monkeypatch, model, loss, optimizer, scheduler):
    cfg = small(combination(combo_root, model=model, loss=loss, optimizer=optimizer, scheduler=scheduler))
    logged, initial = [], {}
    log_metrics, fit = TensorBoardLogger.log_metrics, Trainer.fit
    monkeypatch.setattr(TensorBoardLogger, "log_metrics",
                        lambda self, metrics, step: logged.append((step, dict(metrics)))
                        or log_metrics(self, metrics, step))
    monkeypatch.setattr(Trainer, "fit", lambda self: initial.update(
        {k: v.clone() for k, v in self.model.state_dict().items()}) or fit(self))
    metrics = train.train(cfg, tmp_path)  # 2 epochs x 4 steps, validation, checkpoints, test
    summary = {k: v for k, v in metrics.items() if k.count("/") == 1 or k.startswith("best/")}  # not per class
    assert set(summary) == {"test/loss", "test/acc", "test/f1", "test/balanced_acc", "test/acc_top5", "test/auroc",
                            "test/ece", "best/val/acc"}
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.values())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    fresh = build(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    fresh.load_state_dict(state["model"], strict=True)  # every key, every shape: nothing missing, nothing extra
    assert state["global_step"] == 8
    assert any(not torch.equal(initial[k], v) for k, v in state["model"].items() if v.is_floating_point()), \
        "the optimizer never changed the weights"
    lrs = [m["lr"] for _, m in logged if "lr" in m]  # log_every_n_steps=1: the LR of every step
    val = [m["val/acc"] for _, m in logged if "val/acc" in m]
    assert lrs == pytest.approx(expected_lrs(cfg, val), rel=1e-6)


def test_bce_learns_the_tiny_digits(combo_root, tmp_path):
    """loss=bce end to end: one-vs-rest sigmoids, trained through the real Trainer, classify by their argmax."""
    cfg = combination(combo_root, model="mlp", loss="bce", optimizer="adam", scheduler="none")
    OmegaConf.update(cfg, "trainer.max_epochs", 6)
    metrics = train.train(cfg, tmp_path)
    assert metrics["test/acc"] >= 0.9, metrics


def test_rotation_shift_and_cutout_train_end_to_end(combo_root, tmp_path, monkeypatch):
    """dataset.augment_rotate/augment_shift/augment_cutout through train.py's own setup: every training batch is
    augmented in one resampling pass, the run still learns the tiny digits, and evaluation is left alone."""
    from trainer.data import batches

    augmented, sample = [], torch.nn.functional.grid_sample
    monkeypatch.setattr(batches.F, "grid_sample", lambda x, *a, **k: augmented.append(len(x)) or sample(x, *a, **k))
    cfg = combination(combo_root, model="mlp", loss="cross_entropy", optimizer="adam", scheduler="none")
    for key, value in (("dataset.augment_rotate", 10), ("dataset.augment_shift", 1), ("dataset.augment_cutout", 4),
                       ("trainer.max_epochs", 6)):
        OmegaConf.update(cfg, key, value)
    metrics = train.train(cfg, tmp_path)
    assert augmented == [32, 32, 32, 32] * 6, augmented  # the 4 training batches of each epoch: none at evaluation
    assert metrics["test/acc"] >= 0.8, metrics


def test_mode_min_keeps_the_epoch_with_the_lowest_monitored_value(faint_root, tmp_path):
    """trainer.mode=min with val/loss: best.pt is the epoch of the lowest val/loss (max would keep the highest)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(*TINY, *MLP, f"dataset.root={faint_root}", f"output_root={tmp_path}", "trainer.max_epochs=4",
                 "trainer.monitor=val/loss", "trainer.mode=min", "scheduler=none", "trainer.log_graph=false")
    metrics = train.train(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path)).Reload()
    losses = [e.value for e in events.Scalars("val/loss")]  # one per epoch
    assert len(losses) == 4 and losses.index(min(losses)) != losses.index(max(losses))
    assert metrics["best/val/loss"] == pytest.approx(min(losses), abs=1e-6)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == losses.index(min(losses)) + 1

