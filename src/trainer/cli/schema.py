"""The config schema: the type of every key of every shipped option, in one place.

Each dataclass here is the schema of one option (`configs/<group>/<option>.yaml`), registered in Hydra's
ConfigStore as `schema_<group>_<option>`; the option's YAML puts it first in its defaults list, so composing a
config type-checks every key it sets, whether it comes from the YAML, a preset or the command line, and an option
that extends another (`fashion_mnist` extends `mnist`, `cifar10` extends `torchvision`) extends its schema too.
The values stay in the YAML: a field here has a default only where the YAML has none to give (`???`).

Closed choices are enums whose members are their own values, so they read, compare and print as the strings
the YAML holds. Ranges and rules across keys are not types: each object checks its own (`validate()`,
`require_int`), where a Python caller of the class meets them too. `register()` is called by the commands (and
by whatever composes configs: the rebuild of a checkpoint's model, the tests) before Hydra composes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from trainer.data.splits import SAMPLERS
from trainer.distributed import BACKENDS
from trainer.errors import UserError, shown
from trainer.loop.options import MODES, NONFINITE_POLICIES
from trainer.loop.step import PRECISIONS


class Choice(str, Enum):
    """A closed choice: a str, equal to, hashing like and printing as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choices(name: str, values: Sequence[str]) -> type[Choice]:
    """An enum of `values`, each member named as its value; the values are the code's own list, so the schema and
    the check of a Python caller's value (loop/options.py, loop/step.py, distributed.py) never disagree."""
    return Choice(name, {value: value for value in values})


Precision = choices("Precision", tuple(PRECISIONS))
Mode = choices("Mode", MODES)
NonFinite = choices("NonFinite", NONFINITE_POLICIES)
Anneal = choices("Anneal", ("cos", "linear"))  # torch's OneCycleLR anneal_strategy
Backend = choices("Backend", BACKENDS)
Split = choices("Split", ("val", "test"))
Sampler = choices("Sampler", SAMPLERS)


# ---- dataset ----------------------------------------------------------------------------------------------------

@dataclass
class DatasetCommon:
    """configs/dataset_base/common.yaml: what every dataset takes. `val_size`, `test_size`: a count or a fraction;
    `mean`, `std`: a number, one per channel, or auto."""

    _target_: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    val_size: Any = MISSING
    test_size: Any = MISSING
    split_seed: int = MISSING
    mean: Any = MISSING
    std: Any = MISSING
    augment_shift: int = MISSING
    augment_rotate: float = MISSING
    augment_cutout: int = MISSING
    random_crop: int = MISSING
    hflip: bool = MISSING
    shuffle: bool = MISSING
    drop_last: bool = MISSING
    cache: bool = MISSING
    device_margin_gib: float = MISSING
    sampler: Sampler = MISSING
    folds: Optional[int] = None
    fold: int = MISSING
    memory_budget_gib: Optional[float] = None


@dataclass
class MNISTDataset(DatasetCommon):
    root: str = MISSING
    download: bool = MISSING
    mirror: Optional[str] = None
    verify: bool = MISSING


@dataclass
class ImageFolderDataset(DatasetCommon):
    path: str = MISSING
    image_size: Optional[List[int]] = None
    channels: Optional[int] = None
    labels: Optional[str] = None


@dataclass
class TensorsDataset(DatasetCommon):
    path: str = MISSING


@dataclass
class TorchvisionDataset(DatasetCommon):
    name: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    split: Optional[str] = None
    image_size: Optional[List[int]] = None
    channels: Optional[int] = None


# ---- model ------------------------------------------------------------------------------------------------------

@dataclass
class CNNModel:
    _target_: str = MISSING
    channels: List[int] = MISSING
    kernel_sizes: List[int] = MISSING
    convs_per_stage: int = MISSING
    pool_first: bool = MISSING
    hidden: int = MISSING
    dropout: float = MISSING
    batch_norm: bool = MISSING
    activation: str = MISSING  # any activation module of torch.nn, by class name: checked where it is built


@dataclass
class MLPModel:
    _target_: str = MISSING
    hidden_sizes: List[int] = MISSING
    activation: str = MISSING
    dropout: float = MISSING


@dataclass
class TorchvisionModel:
    _target_: str = MISSING
    name: str = MISSING
    weights: Optional[str] = None


# ---- loss -------------------------------------------------------------------------------------------------------

@dataclass
class Target:
    """An option whose class takes no setting."""

    _target_: str = MISSING


@dataclass
class WeightedLoss(Target):
    class_weights: Any = None  # null, auto, or a list of one number per class: checked by losses.class_weights_for


@dataclass
class BCELoss(WeightedLoss):
    pos_weight: Optional[float] = None


@dataclass
class CrossEntropyLoss(WeightedLoss):
    label_smoothing: float = MISSING


@dataclass
class MultiMarginLoss(WeightedLoss):
    p: int = MISSING
    margin: float = MISSING


@dataclass
class HuberLoss(Target):
    delta: float = MISSING


@dataclass
class PoissonNLLLoss(Target):
    log_input: bool = MISSING
    full: bool = MISSING


@dataclass
class MarginLoss(Target):
    margin: float = MISSING


Mining = choices("Mining", ("batch_hard", "semi_hard"))


@dataclass
class TripletLoss(MarginLoss):
    mining: Mining = MISSING


# ---- task -------------------------------------------------------------------------------------------------------

@dataclass
class MultiLabelTask(Target):
    threshold: float = MISSING


@dataclass
class RegressionTask(Target):
    normalize: bool = MISSING


@dataclass
class EmbeddingTask(Target):
    embedding_dim: int = MISSING


# ---- optimizer --------------------------------------------------------------------------------------------------

@dataclass
class Optimizer(Target):
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class AdadeltaOptimizer(Optimizer):
    rho: float = MISSING


@dataclass
class AdamOptimizer(Optimizer):
    betas: List[float] = MISSING


@dataclass
class RMSpropOptimizer(Optimizer):
    alpha: float = MISSING
    momentum: float = MISSING


@dataclass
class SGDOptimizer(Optimizer):
    momentum: float = MISSING
    nesterov: bool = MISSING


# ---- scheduler --------------------------------------------------------------------------------------------------

@dataclass
class CosineScheduler(Target):
    eta_min: float = MISSING


@dataclass
class ExponentialScheduler(Target):
    gamma: float = MISSING


@dataclass
class MultistepScheduler(Target):
    milestones: List[int] = MISSING
    gamma: float = MISSING


@dataclass
class OnecycleScheduler(Target):
    max_lr: float = MISSING
    pct_start: float = MISSING
    div_factor: float = MISSING
    final_div_factor: float = MISSING
    anneal_strategy: Anneal = MISSING
    cycle_momentum: bool = MISSING


@dataclass
class PlateauScheduler(Target):
    mode: Mode = MISSING
    factor: float = MISSING
    patience: int = MISSING
    threshold: float = MISSING
    min_lr: float = MISSING


@dataclass
class StepScheduler(Target):
    step_size: int = MISSING
    gamma: float = MISSING


@dataclass
class WarmupScheduler(Target):
    warmup_steps: int = MISSING


# ---- trainer, logger, distributed -------------------------------------------------------------------------------

@dataclass
class TrainerSettings:
    """configs/trainer/default.yaml; trainer.loop.options sorts these into the Trainer's option objects."""

    max_epochs: int = MISSING
    device: str = MISSING
    deterministic: bool = MISSING
    grad_clip_norm: Optional[float] = None
    log_every_n_steps: int = MISSING
    monitor: str = MISSING
    mode: Mode = MISSING
    checkpoint_dir: str = MISSING
    checkpoint_every_n_steps: Optional[int] = None
    resume: Optional[str] = None
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = MISSING
    nonfinite_loss: NonFinite = MISSING
    precision: Precision = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING
    accumulate_grad_batches: int = MISSING
    num_threads: Optional[int] = None
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    misclassified_images: int = MISSING
    histogram_every_n_epochs: Optional[int] = None
    ema_decay: Optional[float] = None
    ema_warmup: bool = MISSING
    log_graph: bool = MISSING
    cuda_graphs: bool = MISSING
    top_k: Optional[int] = None
    full_val_metrics: bool = MISSING


@dataclass
class TensorBoardLoggerSettings(Target):
    _partial_: bool = MISSING
    flush_secs: int = MISSING


@dataclass
class CSVLoggerSettings(Target):
    _partial_: bool = MISSING
    flush_secs: float = MISSING


@dataclass
class MLflowLoggerSettings(Target):
    _partial_: bool = MISSING
    tracking_uri: Optional[str] = None
    experiment_name: str = MISSING
    run_name: Optional[str] = None
    output_root: str = MISSING
    sweep_dir: Optional[str] = None
    flush_secs: float = MISSING


@dataclass
class KeepCheckpointsCallback(Target):
    every_n_epochs: int = MISSING
    keep_last: Optional[int] = None


@dataclass
class DistributedSettings(Target):
    backend: Backend = MISSING
    timeout_s: float = MISSING


# ---- the commands' own keys -------------------------------------------------------------------------------------

@dataclass
class LRFind:
    """configs/lr_find.yaml's lr_find node."""

    start_lr: float = MISSING
    end_lr: float = MISSING
    num_steps: int = MISSING
    smoothing: float = MISSING
    diverge: float = MISSING


@dataclass
class TrainKeys:
    """The keys of configs/train.yaml outside the groups (checked by `check_keys` once composed: the groups'
    options add nodes to the root, which a structured root would refuse)."""

    seed: int = MISSING
    optimized_metric: Optional[str] = None
    output_root: str = MISSING


@dataclass
class EvalKeys:
    """The keys of configs/eval.yaml outside the dataset group."""

    ckpt: str = MISSING
    split: Split = MISSING
    device: str = MISSING
    trust_checkpoint: bool = MISSING
    data_root: Optional[str] = None
    labels: Optional[str] = None
    tta: List[str] = MISSING
    output_root: str = MISSING


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"mnist": MNISTDataset, "image_folder": ImageFolderDataset, "tensors": TensorsDataset,
                "torchvision": TorchvisionDataset},
    "model": {"cnn": CNNModel, "mlp": MLPModel, "logistic": Target, "torchvision": TorchvisionModel},
    "loss": {"bce": BCELoss, "cross_entropy": CrossEntropyLoss, "mse": Target, "multi_margin": MultiMarginLoss,
             "nll": WeightedLoss, "l1": Target, "huber": HuberLoss, "poisson_nll": PoissonNLLLoss,
             "triplet": TripletLoss,
             "hinge_embedding": MarginLoss, "contrastive": MarginLoss},
    "task": {"classification": Target, "multilabel": MultiLabelTask, "regression": RegressionTask,
             "embedding": EmbeddingTask},
    "optimizer": {"adadelta": AdadeltaOptimizer, "adagrad": Optimizer, "adam": AdamOptimizer, "adamw": AdamOptimizer,
                  "rmsprop": RMSpropOptimizer, "sgd": SGDOptimizer},
    "scheduler": {"cosine": CosineScheduler, "exponential": ExponentialScheduler, "multistep": MultistepScheduler,
                  "none": Target, "onecycle": OnecycleScheduler, "plateau": PlateauScheduler, "step": StepScheduler,
                  "warmup": WarmupScheduler},
    "trainer": {"default": TrainerSettings},
    "logger": {"tensorboard": TensorBoardLoggerSettings, "csv": CSVLoggerSettings, "mlflow": MLflowLoggerSettings},
    "callbacks": {"keep_checkpoints": KeepCheckpointsCallback},
    "distributed": {"default": DistributedSettings},
    "lr_find": {"default": LRFind},
}


def register() -> None:
    """Put every schema into Hydra's ConfigStore (as `schema_<group>_<option>`, a config of no group: --help lists
    only the groups a user picks from); calling it again changes nothing.
    Before anything composes a config: the options' YAML names these in their defaults lists."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for option, schema in schemas.items():
            store.store(name=f"schema_{group}_{option}", node=schema)


def check_keys(config: DictConfig, schema: type, overrides: Sequence[str] = ()) -> None:
    """Type-check a composed config where Hydra's composition does not: the keys of `schema` (a command's own keys,
    outside the groups), and the command line's true/false values. UserError names the value as `overrides` (the
    command line's) spelt it.

    OmegaConf reads yes, no, on, off and any number as a bool ("2" as true); a true/false key of the command line
    takes only true or false, as the YAML writes them, so that `dataset.shuffle=2` is a typo refused, not a switch.
    """
    from omegaconf.errors import ValidationError

    keys = [f.name for f in dataclasses.fields(schema)]
    try:
        OmegaConf.merge(OmegaConf.structured(schema), {k: config[k] for k in keys if k in config})
    except ValidationError as e:
        given = next((o for o in overrides if o.partition("=")[0] == e.full_key), None)  # as the user spelt it
        raise UserError(f"{given or f'{e.full_key}={shown(e.value)}'}: must be {expected(schema, e.full_key)}") \
            from None
    for override in overrides:
        key, assigns, value = override.partition("=")
        key = key.removeprefix("++")
        if not assigns or key.startswith(("+", "~", "hydra.", "hydra/")):
            continue
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(config, parent, default=None) if parent else config
        owner = schema if not parent else OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if isinstance(owner, type) and dataclasses.is_dataclass(owner) and _hint(owner, name)[0] is bool and \
                value.strip().lower() not in ("true", "false", "null"):
            raise UserError(f"{override}: must be {expected(owner, name)}")


def expected(schema: type, key: str) -> str:
    """What `key` of `schema` must be, in words: "an integer", "true or false", "one of fp32, bf16, fp16", ..."""
    hint, optional = _hint(schema, key)
    if typing.get_origin(hint) in (list, List):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        words = f"a list of {_WORDS.get(item, 'values').removeprefix('an ').removeprefix('a ')}s"
        words = words.replace("true or falses", "true/false values")
    elif isinstance(hint, type) and issubclass(hint, Choice):
        words = f"one of {', '.join(member.value for member in hint)}"
    else:
        words = _WORDS.get(hint, "a value")
    return f"{words} or null" if optional else words


def _hint(schema: type, key: str) -> tuple[Any, bool]:
    """The type of `key` in `schema` without its Optional, and whether it was Optional."""
    hint = typing.get_type_hints(schema).get(key, Any)
    optional = type(None) in typing.get_args(hint)
    return (next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint), optional


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
