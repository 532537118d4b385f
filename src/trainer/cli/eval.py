"""Evaluate a trained checkpoint: `htt-eval ckpt=outputs/<date>/<time>/checkpoints/best.pt` (`python eval.py ...` in
a checkout).

The model, its loss and the dataset are rebuilt from the resolved config stored in the checkpoint, so
nothing about them is repeated on the command line. `dataset=fashion_mnist` (any dataset option, with
its keys) evaluates on another dataset of the same image shape and class count; `split=val` on the
validation split held out in training. Prints the metrics, per-class accuracy and the confusion matrix,
and writes them (metrics.json with per-class precision, recall, F1 and AUROC, confusion_matrix.csv, and the
reliability diagram of ECE, reliability.png) into this evaluation's own run directory.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from trainer.cli.config import (
    build,
    build_loss,
    build_metrics,
    check_fits,
    data_config,
    model_from_checkpoint,
)
from trainer.cli.config_errors import with_one_line_errors
from trainer.cli.paths import CONFIG_SOURCE, command_line, prepare_hydra
from trainer.cli.process import run_then_exit
from trainer.cli.schema import EvalKeys, check_keys
from trainer.data import ImageDataset
from trainer.data.tta import describe, with_tta
from trainer.errors import (
    UserError,
    error_line,
    printable,
)
from trainer.loop.metrics import EpochMetrics, Forward, evaluate
from trainer.loop.step import autocast_for, check_precision, forward_pass
from trainer.report.figures import png, reliability_diagram, scatter
from trainer.report.run_report import is_per_class, per_class_accuracy
from trainer.run.files import atomic_write, discard_refused_run
from trainer.system import resolve_device
from trainer.tasks import Task

log = logging.getLogger("eval")


def evaluate_checkpoint(ckpt: str, dataset: DictConfig | None, split: str, device_name: str,
                        out_dir: Path, trust: bool = False, data_root: str | None = None,
                        metrics: DictConfig | None = None, labels: str | None = None,
                        tta: list[str] | None = None) -> dict:
    """Evaluate `ckpt` on `split` of its own dataset (or of `dataset`); write and return the results.
    `tta`: test-time augmentation's views (trainer.data.tta).
    `trust`, `data_root` (where its dataset's files are): see trainer.cli.config.rebuildable_config. The types of
    `split` (test or val) and `trust` are the schema's (EvalKeys), checked before this is called."""
    device = resolve_device(device_name)
    restored = model_from_checkpoint(ckpt, device, trust, data_root)
    model, trained = restored.model, restored.config
    task = restored.task
    data = build(dataset if dataset is not None else data_config(trained, "data_root=PATH", task.targets, labels),
                 device=device, seed=trained.seed, targets=task.targets)
    check_fits(data, restored.data, ckpt)
    if dataset is None and restored.data["digest"] not in (None, data.digest):
        log.warning("%s: the data is not the data the model was trained on (digest %s, trained on %s): its files "
                    "were added, removed or changed since, or its source reads differently; the %s split may hold "
                    "images it was trained on", printable(data.name),
                    data.digest, printable(restored.data["digest"]), split)
    check_same_fold(data, restored.data, split, ckpt)
    loss_fn = build_loss(trained.loss, data, restored.class_weights)
    # the forward pass the run's own test used: its precision and memory format (bf16 predictions differ from fp32's)
    precision, channels_last = trained.trainer.precision, trained.trainer.channels_last
    try:  # values from the file that only fail when used: refused now, in one line, as train.py refuses them
        check_precision(precision)
        task.check_loss(loss_fn, data, device)
    except UserError as e:
        raise UserError(f"refusing {ckpt}: its stored {e}") from None
    if precision == "fp16" and device.type != "cuda":
        log.info("trained with trainer.precision=fp16, which needs CUDA: evaluating in fp32 on %s", device.type)
        precision = "fp32"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = with_tta(model, tta or [], augment_shift=trained.dataset.augment_shift,
                     random_crop=trained.dataset.random_crop, mean=data.mean, std=data.std, task=task.name)
    if tta:
        log.info("test-time augmentation (tta=[%s]): %s", ",".join(tta), describe(model))
    forward = functools.partial(forward_pass, model, task.loss(loss_fn).to(device), channels_last=channels_last,
                                autocast=autocast_for(precision, device))
    top_k = trained.trainer.get("top_k", 5)  # a checkpoint from before top-k: its default
    extra = build_metrics(metrics, data.num_classes, device)
    if task.name != "classification":
        return _evaluate_task(task, forward, data, split, extra, top_k, out_dir, ckpt, restored.epoch)

    measured = EpochMetrics(data.num_classes, device, confusion_matrix=True, top_k=top_k, full=True,
                            classes=data.classes, extra=extra)
    results = evaluate(forward, getattr(data, split), measured, split)
    confusion = measured.last_confusion.cpu()  # (classes, classes): rows true, columns predicted
    per_class = per_class_accuracy(confusion)
    summary = {**results, "per_class_acc": dict(zip(data.classes, per_class)), "checkpoint": str(ckpt),
               "checkpoint_epoch": restored.epoch, "dataset": data.name, "split": split,
               "images": int(confusion.sum()), "tta": list(tta or [])}
    with atomic_write(out_dir / "metrics.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["true \\ predicted", *data.classes])
    writer.writerows([name, *row] for name, row in zip(data.classes, confusion.tolist()))
    with atomic_write(out_dir / "confusion_matrix.csv") as f:
        f.write(table.getvalue().encode())
    with atomic_write(out_dir / "reliability.png") as f:
        f.write(png(reliability_diagram(*measured.last_calibration)))
    log.info("%s: %s split of %s, %d images (checkpoint from epoch %d)", ckpt, split, printable(data.name),
             summary["images"], restored.epoch)
    log.info("  ".join(f"{k} {v:.4f}" for k, v in results.items() if not is_per_class(k)))  # per class: metrics.json
    width = max(6, len(str(int(confusion.max()))) + 1)
    log.info("confusion matrix (rows: true class, columns: predicted class):\n%s\n%s", " " * 16 + "".join(
        f"{i:>{width}}" for i in range(data.num_classes)), "\n".join(
        f"{i:>2} {printable(name)[:12]:<12} " + "".join(f"{n:>{width}}" for n in row) +
        (f"   acc {acc:.2%}" if acc is not None else "   acc n/a (no image of this class)")
        for i, (name, row, acc) in enumerate(zip(data.classes, confusion.tolist(), per_class))))
    log.info("wrote %s (per-class precision, recall, F1 and AUROC too), %s and %s", out_dir / "metrics.json",
             out_dir / "confusion_matrix.csv", out_dir / "reliability.png")
    return summary


def check_same_fold(data: ImageDataset, trained: dict | None, split: str, ckpt: str) -> None:
    """Refuse the validation split of other folds (dataset.folds, dataset.fold) than the model's: it would hold
    images the model was trained on. The test split is the same for every fold."""
    ours, theirs = data.identity().get("fold"), (trained or {}).get("fold")
    if split != "val" or ours == theirs or (trained or {}).get("digest") not in (None, data.digest):
        return

    def words(fold: list | None) -> str:
        return "no folds" if fold is None else f"fold {fold[0]} of dataset.folds={fold[1]} (split_seed {fold[2]})"

    again = "without dataset.folds" if theirs is None else f"dataset.folds={theirs[1]} dataset.fold={theirs[0]}"
    raise UserError(f"split=val: the model in {ckpt} was trained with {words(theirs)}, and this validation split is "
                    f"{words(ours)}'s, which holds images it trained on; evaluate with {again}, or split=test")


def _evaluate_task(task: Task, forward: Forward, data: ImageDataset, split: str, extra: dict, top_k: int | None,
                   out_dir: Path, ckpt: str, epoch: int) -> dict:
    """`evaluate_checkpoint` for the tasks beyond classification: their metrics into metrics.json, and a
    regression's predicted-against-true picture per column (scatter.png; scatter_<column>.png for several)."""
    measured = task.metrics("test", data=data, device=data.test.device, top_k=top_k, full=True, extra=extra)
    results = evaluate(forward, getattr(data, split), measured, split)
    loader = getattr(data, split)
    summary = {**results, "task": task.name, "checkpoint": str(ckpt), "checkpoint_epoch": epoch,
               "dataset": data.name, "split": split, "images": loader.num_items}
    with atomic_write(out_dir / "metrics.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    written = [out_dir / "metrics.json"]
    points = getattr(measured, "last_points", None)
    if points is not None:
        for j, name in enumerate(data.classes):
            column = re.sub(r"[^\w.-]", "_", name)[:64]  # a file name, whatever the column's name holds
            path = out_dir / ("scatter.png" if len(data.classes) == 1 else f"scatter_{j}_{column}.png")
            with atomic_write(path) as f:
                f.write(png(scatter(points[0][:, j], points[1][:, j], name)))
            written.append(path)
    log.info("%s: %s split of %s, %d images, task %s (checkpoint from epoch %d)", ckpt, split, printable(data.name),
             summary["images"], task.name, epoch)
    log.info("  ".join(f"{k} {v:.4f}" for k, v in results.items() if not is_per_class(k)))  # per label: metrics.json
    log.info("wrote %s", ", ".join(map(str, written)))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_SOURCE, config_name="eval")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_keys(cfg, EvalKeys, HydraConfig.get().overrides.task)  # a dataset's keys: as Hydra composed them
        evaluate_checkpoint(cfg.ckpt, cfg.dataset, cfg.split, cfg.device, out_dir, cfg.trust_checkpoint,
                            cfg.data_root, cfg.get("metrics"), cfg.labels, list(cfg.tta))
        return
    except UserError as e:
        message = error_line(e)
    except MissingMandatoryValue:
        message = f"error: ckpt is required: {command_line()} ckpt=outputs/<date>/<time>/checkpoints/best.pt"
    except BaseException:  # a fault that is not the user's (its traceback follows) or Ctrl-C: nothing kept either
        discard(out_dir, Path(cfg.output_root))
        raise
    discard(out_dir, Path(cfg.output_root))
    print(message, file=sys.stderr)
    sys.exit(1)


def discard(out_dir: Path, output_root: Path) -> None:
    """Remove this evaluation's directory: a refused or failed evaluation leaves nothing behind."""
    if HydraConfig.get().mode == RunMode.RUN:
        discard_refused_run(out_dir, output_root)


def run() -> None:
    """The command (`htt-eval`, `python eval.py`), once trainer.cli.entry has prepared the process."""
    given = [a for a in sys.argv[1:] if "=" not in a and a.endswith((".pt", ".pth"))]
    if given:  # as predict and export take it; Hydra's grammar would answer with a LexerNoViableAltException
        print(f"error: {given[0]}: give the checkpoint as ckpt={given[0]}", file=sys.stderr)
        sys.exit(1)
    prepare_hydra()  # ${root_dir:} and the schemas, which configs/eval.yaml use
    # without the interpreter's 0.8 s teardown of torch (trainer/cli/process.py)
    run_then_exit(with_one_line_errors(main))
