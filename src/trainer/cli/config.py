"""Objects from config nodes: `build()` for every `_target_`, `model_from_checkpoint()` for a trained model.

train.py, eval.py and the scripts all make objects through these two, so a bad value reads the same
everywhere. A checkpoint is untrusted input: `rebuildable_config()` takes the classes from the config options
the user runs with (the shipped ones and the folders given with --config-dir), and only plain, type-checked values
from the file.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from trainer.cli.options import (
    option_dirs,
    option_target,
    options,
)
from trainer.cli.paths import CONFIG_DIR, prepare_hydra
from trainer.data import IDXImageDataset, ImageDataset
from trainer.errors import UserError, one_line
from trainer.loop.losses import class_weights_for
from trainer.run.changes import FORMER_TARGETS
from trainer.run.checkpoint import GROUPS, LIST_GROUPS, RESERVED, load_checkpoint
from trainer.run.untrusted import MAX_IMAGE_ELEMENTS, require_memory
from trainer.tasks import Task, task_from_state

# Where files are read and written on this machine: never taken from a checkpoint (it may come from a stranger,
# and another machine's paths mean nothing here); always this machine's own values.
WHERE = ("output_root", "dataset.root", "dataset.path", "dataset.labels", "dataset.mirror", "trainer.resume",
         "trainer.checkpoint_dir")
TRUST_HINT = ("an option of your own project is found with --config-dir DIR (your configs folder); only if you "
              "trust the file, rebuild it from the file's own config with trust_checkpoint=true (eval) or "
              "--trust-checkpoint (predict, export)")


def build(node: DictConfig, **runtime: Any) -> Any:
    """`hydra.utils.instantiate` with plain containers, turning bad values into a one-line UserError."""
    try:
        # plain values: a schema's closed choice (an enum) reaches the class as the string it is in the YAML
        plain = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
        return hydra.utils.instantiate(plain, _convert_="all", **runtime)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        key = node._get_full_key(None) or node._key()  # logger.csv, not csv
        if isinstance(cause, ImportError) and str(e).startswith("Error locating target"):
            # Hydra's several lines; the module or name is the user's (a typo, or a module not on the import path)
            found = cause.__cause__ if cause.__cause__ is not None else cause
            raise UserError(f"{key}._target_={node._target_}: cannot import it ({_import_failure(node._target_, found)}"
                            "); a module of your own is imported from the current folder or an installed "
                            "package") from None
        if isinstance(cause, (ValueError, TypeError)):
            values = ", ".join(f"{k}={v}" for k, v in node.items() if k not in ("_target_", "_partial_"))
            raise UserError(f"{key}={node._target_.rsplit('.', 1)[-1]}({values}): {cause}") from None
        raise


def build_loss(node: DictConfig, data: ImageDataset, recorded: list[float] | None = None) -> Any:
    """The loss of `node`. An option with `class_weights` gets them resolved against `data`'s training split
    (`auto`: inverse frequency; a list: checked against the class count), or, rebuilding a checkpoint's loss, the
    weights it `recorded` (its run's, whatever data it is now evaluated on)."""
    if "class_weights" not in node:
        return build(node)
    if recorded is None:
        value = OmegaConf.to_container(node, resolve=True).get("class_weights")
        recorded = class_weights_for(value, data.class_counts, data.classes)
    return build(node, class_weights=recorded)


def _import_failure(target: str, error: BaseException) -> str:
    """Why `target` did not import: the module's own error, or that the module has no such name (where Python's
    words, `No module named 'mymod.Nmae'; 'mymod' is not a package`, read as if the module were missing)."""
    import importlib

    module, _, name = target.rpartition(".")
    if module:
        try:
            imported = importlib.import_module(module)
        except Exception:  # noqa: BLE001 (the module's own failure is the one to name, below)
            imported = None
        if imported is not None and not hasattr(imported, name):
            return f"module {module} has no {name}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def build_metrics(node: DictConfig | None, num_classes: int, device: torch.device) -> dict[str, Any]:
    """The `metrics` group's metrics by name (torchmetrics', or any object with update, compute and reset), each
    given `num_classes` where its class takes it, on `device`. Imported only here: a run without them never
    imports torchmetrics."""
    metrics = {}
    for name, option in (node or {}).items():
        factory = build(option)  # a partial: the YAML's _partial_: true
        try:
            takes = "num_classes" in inspect.signature(factory).parameters
            metric = factory(num_classes=num_classes) if takes else factory()
        except (TypeError, ValueError) as e:
            values = ", ".join(f"{k}={v}" for k, v in option.items() if k not in ("_target_", "_partial_"))
            raise UserError(f"metrics.{name}: {option._target_.rsplit('.', 1)[-1]}({values}) refused its settings: "
                            f"{one_line(str(e))}") from None
        missing = [m for m in ("update", "compute", "reset") if not callable(getattr(metric, m, None))]
        if missing:
            raise UserError(f"metrics.{name}: a {type(metric).__name__} has no {', '.join(missing)}: not a metric "
                            "(a torchmetrics Metric takes update(logits, targets), compute() and reset())")
        metrics[name] = metric.to(device) if callable(getattr(metric, "to", None)) else metric
    return metrics


TRAINING_COPIES = 4  # what training holds per weight: the weight, its gradient and Adam's two moments


def build_model(node: DictConfig, in_shape: Sequence[int], num_classes: int,
                weights: Mapping[str, Any] | None = None, misfit: str = "",
                train_on: torch.device | None = None) -> torch.nn.Module:
    """`build(node)` for a model (with `in_shape` and `num_classes`), once its size is known to fit.

    The model is first built on the meta device, which allocates nothing: model.hidden_sizes=[1000000000] was
    killed at 6 GB before any check ran, and weights that fit in the machine but not in its free memory would fill
    it under any allocator. Its weights must then fit in the memory available, and, given a checkpoint's
    `weights`, have their names and shapes, else UserError(`misfit`). To be trained on `train_on`, TRAINING_COPIES
    times the weights must fit there: `hidden_sizes=[45000,45000]` (8 GB of weights) passed a check of the weights
    alone on a 24 GB machine, then ran out of memory in its first step under Adam.
    """
    planned = _on_meta(node, in_shape, num_classes)
    if planned is not None:
        shapes = {k: tuple(t.shape) for k, t in planned.state_dict().items()}
        if weights is not None and not (isinstance(weights, Mapping) and set(weights) == set(shapes) and all(
                isinstance(t, torch.Tensor) and tuple(t.shape) == shapes[k] for k, t in weights.items())):
            raise UserError(misfit)
        count = sum(t.numel() for t in planned.state_dict().values())
        nbytes, what = sum(t.numel() * t.element_size() for t in planned.state_dict().values()), \
            f"model={type(planned).__name__} of {count:,} weights"
        require_memory(nbytes, what, "make the model smaller")
        if train_on is not None:
            require_memory(TRAINING_COPIES * nbytes, f"{what}, trained (the weights, their gradients and the "
                           f"optimizer's two moments: {TRAINING_COPIES} copies),", "make the model smaller",
                           device=train_on)
    return build(node, in_shape=tuple(in_shape), num_classes=num_classes)


def _on_meta(node: DictConfig, in_shape: Sequence[int], num_classes: int) -> torch.nn.Module | None:
    """The model `node` describes, built on the meta device (shapes, no memory); None if it cannot be."""
    node = node.copy()
    if "weights" in node:
        node.weights = None  # pretrained weights have the same shapes; no download for a plan
    try:
        with torch.device("meta"):
            return build(node, in_shape=tuple(in_shape), num_classes=num_classes)
    except UserError:
        raise
    except Exception:  # a model of the user's own that needs real tensors to be built: it is built as it is
        return None


def _inferred_choices(stored: dict, where: Path, dirs: Sequence[Path]) -> dict[str, str]:
    """The options a version-1 checkpoint (which stored no choices) was composed from, by its classes."""
    choices = {}
    for group in (g for g in GROUPS if g not in LIST_GROUPS):  # a run's trackers are not rebuilt
        if not isinstance(stored.get(group) or {}, dict):
            raise UserError(f"refusing {where}: its stored {group} is a {type(stored[group]).__name__}, not a config "
                            "group")
        if group not in stored and group == "task":  # written before tasks: a classifier, the default task
            continue
        target = (stored.get(group) or {}).get("_target_")
        target = FORMER_TARGETS.get(target, target)
        match = [o for o in options(group, dirs) if option_target(group, o, dirs) == target]
        if not match:
            raise UserError(f"refusing to rebuild from {where}: {group}._target_={target} is not one of the "
                            f"{group} options ({', '.join(options(group, dirs))}); {TRUST_HINT}")
        choices[group] = match[0]
    return choices


@contextlib.contextmanager
def _project_configs(dirs: Sequence[Path]) -> Iterator[list[str]]:
    """Hydra's compose API over the shipped configs (train.py and eval.py already run inside it); yields the
    overrides that add the other `dirs` to its search path."""
    prepare_hydra()
    if GlobalHydra.instance().is_initialized():
        yield []
        return
    extra = [f"file://{Path(d).resolve()}" for d in dirs if Path(d).resolve() != CONFIG_DIR]
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield [f"hydra.searchpath=[{','.join(extra)}]"] if extra else []


def _composed(choices: dict[str, str | None], where: Path, dirs: Sequence[Path]) -> dict:
    """train.yaml composed with these options, resolved to plain values: what the run's config looked like
    before its command-line values, with the classes of the options found in `dirs`."""
    for group, option in choices.items():
        if option is not None and option not in options(group, dirs):
            raise UserError(f"refusing to rebuild from {where}: it was trained with {group}={option}, which is "
                            f"not one of the {group} options ({', '.join(options(group, dirs))}); {TRUST_HINT}")
    with _project_configs(dirs) as searchpath:
        config = hydra.compose("train", overrides=[*searchpath,
                                                   *(f"{g}={o}" for g, o in choices.items() if o is not None)])
    return OmegaConf.to_container(config, resolve=True, enum_to_str=True)


def rebuildable_config(state: dict, trust: bool = False, where: Path | str = "the checkpoint",
                       data_root: str | Path | None = None, config_dirs: Sequence[str | Path] = ()) -> DictConfig:
    """The config to rebuild a checkpoint's objects from, safe to hand to `build()`.

    The classes (`_target_`s) and every key come from the config options (the shipped ones and, inside a command,
    those of `--config-dir`; else those in `config_dirs`), chosen by the
    option names the run was composed with (`state["choices"]`, e.g. `model: cnn`). The checkpoint
    contributes only values, each of the type the option's YAML gives it; paths are this machine's (WHERE):
    `data_root` is where the dataset is read: `dataset.root` (default: data/ in the current folder) for datasets
    kept under a root, `dataset.path` (no default: `???`) for a folder or file of the user's own.
    Anything else (another class, an unknown key, a value of the wrong type) is refused with one line.
    `trust=True` takes the stored config as it is, for models from the user's own modules.
    """
    where, dirs = Path(where), option_dirs(config_dirs)
    # What a run picks several of (trackers, callbacks, metrics) is never rebuilt from a checkpoint: a command
    # that needs them takes its own (eval.py's metrics=[...]).
    stored = {k: v for k, v in state["config"].items() if k not in LIST_GROUPS}
    if trust:
        config = OmegaConf.create(stored)
    else:
        choices = state["choices"] if state["choices"] is not None else _inferred_choices(stored, where, dirs)
        config = OmegaConf.create(_checked(_composed(choices, where, dirs), stored, "", choices, where))
    if data_root is not None:
        config.dataset["path" if "path" in config.dataset.keys() else "root"] = str(data_root)  # keys(): with ???
    return config


def _checked(template: Any, stored: Any, key: str, choices: dict, where: Path) -> Any:
    """`stored` if it fits `template` (the option's value), else UserError naming the key."""
    if key in WHERE:
        return template
    if isinstance(template, dict):
        if not isinstance(stored, dict):
            raise UserError(f"refusing {where}: its stored {key} is a {type(stored).__name__}, not a config group")
        out = dict(template)
        for k, value in stored.items():
            name = f"{key}.{k}" if key else k
            if RESERVED.match(k):
                if k in template and FORMER_TARGETS.get(value, value) == template[k]:
                    continue
                option = f"{key}={choices.get(key)}"
                raise UserError(f"refusing to rebuild from {where}: its stored {name}={value} is not "
                                f"what the {option} option has ({name}={template.get(k)}); {TRUST_HINT}")
            if k not in template:
                raise UserError(f"refusing {where}: its stored config has the key {name}, which the "
                                f"options in use do not have; {TRUST_HINT}")
            out[k] = _checked(template[k], value, name, choices, where)
        return out
    if stored is None or _fits(template, stored):
        return stored
    raise UserError(f"refusing {where}: its stored {key}={stored!r} is not a {_kind(template)} like the "
                    f"option's default {template!r}")


def _fits(template: Any, value: Any) -> bool:
    if isinstance(value, dict):
        return False
    if isinstance(value, list):  # a list where the option has a number or a word: mean/std per channel, image_size
        return not isinstance(template, bool) and _plain(value)
    if isinstance(template, list) or template is None:
        return _plain(value) if template is None else isinstance(value, list) and all(map(_plain, value))
    if isinstance(template, bool) or isinstance(value, bool):
        return isinstance(template, bool) and isinstance(value, bool)
    if isinstance(template, int):
        return isinstance(value, int)
    if isinstance(template, float):
        return isinstance(value, (int, float))
    return isinstance(template, str) and isinstance(value, str)


def _plain(value: Any) -> bool:
    """A number, string, bool, None, or a list of them (lists may nest)."""
    if isinstance(value, list):
        return all(map(_plain, value))
    return value is None or isinstance(value, (bool, int, float, str))


def _kind(template: Any) -> str:
    return {bool: "bool", int: "integer", float: "number", str: "string", list: "list"}.get(type(template), "value")


@dataclass(frozen=True)
class TrainedModel:
    """A model rebuilt from a checkpoint, with its trained weights, in eval mode."""

    model: torch.nn.Module
    config: DictConfig  # the config it was trained with, as `rebuildable_config` returns it
    task: Task  # what it was trained for, with what the task learnt (a regression's scale, class centroids)
    data: dict[str, Any]  # the identity of the data it was trained on: see ImageDataset.identity
    epoch: int  # the epoch the checkpoint was written in
    class_weights: list[float] | None = None  # loss.class_weights as the run resolved them


def model_from_checkpoint(ckpt: str | Path, device: torch.device | str = "cpu", trust: bool = False,
                          data_root: str | Path | None = None, config_dirs: Sequence[str | Path] = ()) -> TrainedModel:
    """Rebuild the model in `ckpt` from the config options and the values stored with it. `trust`, `data_root`
    and `config_dirs`: see rebuildable_config. Raises UserError for an unreadable or untrustworthy checkpoint.
    """
    state = load_checkpoint(ckpt)
    trained = rebuildable_config(state, trust, ckpt, data_root, config_dirs)
    data = data_identity(state, trained, ckpt)
    model_config = trained.model.copy()
    if "weights" in model_config:
        model_config.weights = None  # no pretrained download: the checkpoint holds the trained weights
    task = task_from_state(state.get("task"), str(ckpt))
    outputs = task.output_size(len(data["classes"]))
    misfit = (f"{ckpt}: its weights do not fit the model its config describes "
              f"({data['name']}, {outputs} outputs for {len(data['classes'])} classes of {tuple(data['in_shape'])} "
              "images)")
    model = build_model(model_config, data["in_shape"], outputs, state["model"], misfit)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):  # other shapes or keys; not a state dict at all
        raise UserError(misfit) from None
    return TrainedModel(model.to(device).eval(), trained, task, data, state["epoch"], state["class_weights"])


def data_identity(state: dict, trained: DictConfig, where: Path | str = "the checkpoint") -> dict[str, Any]:
    """The identity of the data a checkpoint was trained on. A file from before version 3 has none stored: its
    dataset was MNIST or FashionMNIST (this checkout's option class says which), whose identity is fixed."""
    if state["data"] is not None:
        shape = state["data"]["in_shape"]
        # The model is rebuilt, run on trial and fed images at this size. A resume compares it with its own data's
        # instead, so only a rebuild bounds it.
        if math.prod(shape) > MAX_IMAGE_ELEMENTS:
            raise UserError(f"refusing {where}: its stored image shape {shape} has "
                            f"{math.prod(shape)} elements; a model is rebuilt for images of at most "
                            f"{MAX_IMAGE_ELEMENTS} (C*H*W)")
        return state["data"]
    cls = get_class(trained.dataset._target_)
    if not (isinstance(cls, type) and issubclass(cls, IDXImageDataset)):
        raise UserError(f"{trained.dataset._target_}: a checkpoint from before version 3 must be of MNIST or "
                        "FashionMNIST")
    return {"name": cls.name, "in_shape": [1, 28, 28], "classes": list(cls.class_names),
            "mean": [float(trained.dataset.mean)], "std": [float(trained.dataset.std)], "digest": None}


def data_config(trained: DictConfig, option: str, targets: str = "class", labels: str | Path | None = None,
                labels_option: str = "labels=FILE.csv") -> DictConfig:
    """The dataset node of a rebuilt config, refused in one line when it needs a path only the user can give
    (`option`: how to give it, e.g. data_root=PATH). An image folder whose `targets` (the task's) came from a labels
    CSV needs that file too: `labels` (`labels_option` says how to give it)."""
    if "path" in trained.dataset.keys() and OmegaConf.is_missing(trained.dataset, "path"):
        raise UserError(f"the checkpoint was trained on a folder or file of your own (dataset.path on the machine "
                        f"it was trained on, which is never read from the file); say where it is here: {option}")
    dataset = trained.dataset
    if "labels" in dataset.keys():
        if labels is not None:
            dataset.labels = str(labels)
        elif targets != "class" and dataset.labels is None:
            raise UserError("the checkpoint's targets came from a labels file (dataset.labels on the machine it was "
                            f"trained on, which is never read from the file); say where it is here: {labels_option}")
    return dataset


def check_fits(data: ImageDataset, trained: dict[str, Any], ckpt: str | Path) -> None:
    """Raise UserError unless `data`'s images and class count are what the model in `ckpt` was trained for."""
    if tuple(data.in_shape) != tuple(trained["in_shape"]) or data.num_classes != len(trained["classes"]):
        raise UserError(f"dataset={data.name} ({data.num_classes} classes of {tuple(data.in_shape)} images) does not "
                        f"fit the model in {ckpt}, trained on {trained['name']} ({len(trained['classes'])} classes "
                        f"of {tuple(trained['in_shape'])} images)")
