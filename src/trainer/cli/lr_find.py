"""The LR range test: `htt-lr-find [overrides]` (`python scripts/lr_find.py` in a checkout), with the overrides
train.py would take.

Builds the dataset, model, loss and optimizer exactly as `python train.py OVERRIDES` would, trains a copy of the
model for `lr_find.num_steps` steps while the LR grows exponentially from `lr_find.start_lr` to `lr_find.end_lr`
(stopping once the smoothed loss diverges), and suggests an LR (src/trainer/lr_find.py says by which rule).
Writes lr_find.png, lr_find.json and a TensorBoard event file to outputs/lr_find/<date>/<time>/, and prints the
train.py command with the suggested `optimizer.lr`. Nothing is trained or written for a run of train.py.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from trainer.config import build, build_model, check_override_types
from trainer.errors import UserError, error_line, one_line_config_errors
from trainer.figures import lr_find_plot
from trainer.fsutil import atomic_write, discard_refused_run
from trainer.logger import NullLogger
from trainer.lr_find import RangeTest, check_range_settings, lr_range_test
from trainer.paths import CONFIG_SOURCE, command_line, register_resolvers
from trainer.runtime import resolve_device, seed_everything

log = logging.getLogger("lr_find")


def find(cfg: DictConfig, out_dir: Path) -> RangeTest:
    """Seed, data, model, loss, optimizer as train.py builds them, with the Trainer's checks of its settings
    (so the printed train.py command is one train.py takes); then the range test, and its files."""
    check_range_settings(**cfg.lr_find)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    data = build(cfg.dataset, device=device, seed=cfg.seed)
    model = build_model(cfg.model, data.in_shape, data.num_classes, train_on=device).to(device)
    loss_fn = build(cfg.loss)
    optimizer = build(cfg.optimizer, params=model.parameters())
    # The Trainer checks its settings where it is built; build it (without training: no run directory of its
    # own, no logger) so a setting train.py would refuse is refused here too.
    build(cfg.trainer, model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=build(cfg.scheduler, _partial_=True),
          data=data, logger=NullLogger, device=device, run_dir=out_dir, resume=None, config_yaml="{}")
    passes = iter(range(sys.maxsize))

    def batches():  # a new shuffled pass over the training split, as each epoch of train.py is
        data.train.set_epoch(next(passes))
        return iter(data.train)

    log.info("LR range test: %s, %s on %s, %d steps from %g to %g", type(model).__name__,
             type(optimizer).__name__, data.name, cfg.lr_find.num_steps, cfg.lr_find.start_lr, cfg.lr_find.end_lr)
    result = lr_range_test(model, loss_fn, optimizer, batches, start_lr=cfg.lr_find.start_lr,
                           end_lr=cfg.lr_find.end_lr, num_steps=cfg.lr_find.num_steps,
                           smoothing=cfg.lr_find.smoothing, diverge=cfg.lr_find.diverge)
    plot = lr_find_plot(result.lrs, result.losses, result.smoothed, result.suggestion)  # (3, H, W) uint8
    with atomic_write(out_dir / "lr_find.png") as f:
        Image.fromarray(plot.permute(1, 2, 0).numpy()).save(f, format="PNG")
    with atomic_write(out_dir / "lr_find.json") as f:
        f.write(json.dumps({"suggestion": result.suggestion, "diverged": result.diverged, "lr": result.lrs,
                            "loss": result.losses, "smoothed_loss": result.smoothed}, indent=1).encode())
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir)) as writer:
        for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            # against the step: TensorBoard's x axis is linear, so the lr is a curve of its own (the PNG plots
            # loss against a log-scale lr)
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", smooth, step)
            writer.add_scalar("lr_find/lr", lr, step)
        writer.add_image("lr_find/curve", plot, 0)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_SOURCE, config_name="lr_find")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_override_types(cfg, HydraConfig.get().overrides.task, HydraConfig.get().runtime.choices, "lr_find")
        result = find(cfg, out_dir)
    except UserError as e:
        discard_refused_run(out_dir, Path(cfg.output_root))
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+~").startswith(("optimizer.lr=", "lr_find."))]
    steps = len(result.lrs)
    log.info("%d steps, %s; the smoothed loss was lowest at lr %.2e", steps,
             "stopped when the loss diverged" if result.diverged else "no divergence", result.suggestion * 5)
    log.info("wrote %s, %s and the TensorBoard curve in %s", out_dir / "lr_find.png", out_dir / "lr_find.json", out_dir)
    print(f"suggested learning rate: {result.suggestion:.2e} (a fifth of the LR at the smoothed loss's minimum)\n"
          f"  {command_line(script='train')} {shlex.join([*overrides, f'optimizer.lr={result.suggestion:.2e}'])}")


def run() -> None:
    """The command (`htt-lr-find`, `python scripts/lr_find.py`), once trainer.cli.entry has prepared the process."""
    register_resolvers()  # ${root_dir:}, which configs/train.yaml uses
    one_line_config_errors()
    main()
