"""The LR range test: `htt-lr-find [overrides]` (`python scripts/lr_find.py` in a checkout), with the overrides
train.py would take.

Builds the dataset, model, loss and optimizer exactly as `python train.py OVERRIDES` would, trains a copy of the
model for `lr_find.num_steps` steps while the LR grows exponentially from `lr_find.start_lr` to `lr_find.end_lr`
(stopping once the smoothed loss diverges), and suggests an LR (src/trainer/loop/lr_find.py says by which rule).
Writes lr_find.png, lr_find.json and a TensorBoard event file to outputs/lr_find/<date>/<time>/, and prints the
train.py command with the suggested `optimizer.lr`. Nothing is trained or written for a run of train.py.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.cli.config import build, build_loss, build_model
from trainer.cli.config_errors import with_one_line_errors
from trainer.cli.paths import CONFIG_SOURCE, command_line, prepare_hydra
from trainer.cli.schema import TrainKeys, check_keys
from trainer.errors import UserError, error_line
from trainer.loop.lr_find import RangeTest, check_range_settings, divisor_for, lr_range_test
from trainer.loop.options import TrainerOptions
from trainer.loop.seeding import seed_everything
from trainer.loop.trainer import Trainer
from trainer.report.tracker import NullLogger
from trainer.run.files import atomic_write, discard_refused_run
from trainer.system import resolve_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("lr_find")


def find(cfg: DictConfig, out_dir: Path) -> RangeTest:
    """Seed, data, model, loss, optimizer as train.py builds them, with the Trainer's checks of its settings
    (so the printed train.py command is one train.py takes); then the range test, and its files."""
    check_range_settings(**cfg.lr_find)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    task = build(cfg.task)
    data = build(cfg.dataset, device=device, seed=cfg.seed, targets=task.targets)
    model = build_model(cfg.model, data.in_shape, task.output_size(data.num_classes), train_on=device).to(device)
    loss_fn = build_loss(cfg.loss, data)
    optimizer = build(cfg.optimizer, params=model.parameters())
    # The Trainer checks its settings where it is built; build it (without training: no run directory of its
    # own, no logger) so a setting train.py would refuse is refused here too.
    settings = {**OmegaConf.to_container(cfg.trainer, resolve=True, enum_to_str=True), "resume": None}
    checked = Trainer(model=model, loss_fn=loss_fn, optimizer=optimizer,
                      scheduler=build(cfg.scheduler, _partial_=True), data=data, logger=NullLogger, device=device,
                      run_dir=out_dir, options=TrainerOptions.from_settings(settings), task=task)
    loss_fn = checked.loss_fn  # as the task has the loop call it (a regression's on standardised targets)
    passes = iter(range(sys.maxsize))

    def batches():  # a new shuffled pass over the training split, as each epoch of train.py is
        data.train.set_epoch(next(passes))
        return iter(data.train)

    log.info("LR range test: %s, %s on %s, %d steps from %g to %g", type(model).__name__,
             type(optimizer).__name__, data.name, cfg.lr_find.num_steps, cfg.lr_find.start_lr, cfg.lr_find.end_lr)
    result = lr_range_test(model, loss_fn, optimizer, batches, start_lr=cfg.lr_find.start_lr,
                           end_lr=cfg.lr_find.end_lr, num_steps=cfg.lr_find.num_steps,
                           smoothing=cfg.lr_find.smoothing, diverge=cfg.lr_find.diverge)
    result.divisor = divisor_for(cfg.scheduler.get("_target_", ""))  # the schedule train.py would run with
    figure = plot(result)
    with atomic_write(out_dir / "lr_find.png") as f:
        figure.savefig(f, format="png")
    with atomic_write(out_dir / "lr_find.json") as f:
        f.write(json.dumps({"suggestion": result.suggestion, "lowest_lr": result.lowest_lr,
                            "divisor": result.divisor, "diverged": result.diverged, "lr": result.lrs,
                            "loss": result.losses, "smoothed_loss": result.smoothed}, indent=1).encode())
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir)) as writer:
        for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            # against the step: TensorBoard's x axis is linear, so the lr is a curve of its own (the PNG plots
            # loss against a log-scale lr)
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", smooth, step)
            writer.add_scalar("lr_find/lr", lr, step)
        writer.add_figure("lr_find/curve", figure, 0)
    return result


def loss_range(losses: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float]:
    """The plot's loss axis: from the lowest loss up to the highest smoothed loss before the smoothed minimum, so
    the whole descent shows; the divergence after the minimum is cut off at that level."""
    y_lo = min(min(losses), min(smoothed))
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    top = max(smoothed[:lowest + 1])
    y_hi = top + 0.05 * (top - y_lo)
    return y_lo, y_hi if y_hi > y_lo else y_lo + 1


def plot(result: RangeTest) -> Figure:
    """The loss against the LR (log scale): raw losses faint, the smoothed curve dark, its lowest point marked, the
    suggested LR as a vertical line with its value. Matplotlib is imported here only: no training run pays for it."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no backend chosen for the process

    lrs, smoothed = result.lrs, result.smoothed
    figure = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(lrs, result.losses, color="#bebeeb", linewidth=1, label="loss")
    axes.plot(lrs, smoothed, color="#1e3cc8", linewidth=2, label="smoothed loss")
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    axes.plot([lrs[lowest]], [smoothed[lowest]], "o", markerfacecolor="none", color="#1e3cc8",
              label=f"lowest at {lrs[lowest]:.2e}")
    axes.axvline(result.suggestion, color="#dc2828", linewidth=2, label=f"suggested {result.suggestion:.2e}")
    axes.set_xscale("log")
    axes.set_ylim(*loss_range(result.losses, smoothed))
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss")
    axes.set_title("LR range test")
    axes.grid(True, which="major", color="#e1e1e1")
    axes.legend(loc="lower left")
    return figure


@hydra.main(version_base="1.3", config_path=CONFIG_SOURCE, config_name="lr_find")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_keys(cfg, TrainKeys, HydraConfig.get().overrides.task)  # the groups' and lr_find's: as composed
        result = find(cfg, out_dir)
    except UserError as e:
        discard_refused_run(out_dir, Path(cfg.output_root))
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+~").startswith(("optimizer.lr=", "lr_find."))]
    steps = len(result.lrs)
    log.info("%d steps, %s; the smoothed loss was lowest at lr %.2e", steps,
             "stopped when the loss diverged" if result.diverged else "no divergence", result.lowest_lr)
    log.info("wrote %s, %s and the TensorBoard curve in %s", out_dir / "lr_find.png", out_dir / "lr_find.json", out_dir)
    rule = ("half the LR at the smoothed loss's minimum: the one-cycle schedule warms up to it and anneals" if
            result.divisor == 2 else "a fifth of the LR at the smoothed loss's minimum: the schedule trains at it "
            "from the first step")
    print(f"suggested learning rate: {result.suggestion:.2e} ({rule})\n"
          f"  {command_line(script='train')} {shlex.join([*overrides, f'optimizer.lr={result.suggestion:.2e}'])}")


def run() -> None:
    """The command (`htt-lr-find`, `python scripts/lr_find.py`), once trainer.cli.entry has prepared the process."""
    prepare_hydra()  # ${root_dir:} and the schemas, which configs/train.yaml use
    with_one_line_errors(main)()
