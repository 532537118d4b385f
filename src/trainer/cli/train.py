"""Train an image classifier: `htt-train model=cnn optimizer=adam trainer.max_epochs=3` (`python train.py ...` in
a checkout).

The composition root: every object is built here from its config group, in the order a reader
expects, and handed to the Trainer. Nothing else in the project reads the config.
`torchrun --nproc_per_node=N train.py ...` trains with N processes (docs/distributed.md).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import hydra
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from trainer.cli.config import build, build_loss, build_metrics, build_model
from trainer.cli.config_errors import with_one_line_errors
from trainer.cli.options import shadowed_options
from trainer.cli.paths import CONFIG_SOURCE, command_line, prepare_hydra
from trainer.cli.process import run_then_exit
from trainer.cli.schema import TrainKeys, check_keys
from trainer.distributed import (
    lost_peer_message,
    rank_from_env,
    worker_hydra_overrides,
    world_size_from_env,
)
from trainer.errors import UserError, error_line, printable
from trainer.loop.options import TrainerOptions
from trainer.loop.seeding import seed_everything
from trainer.loop.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from trainer.report.logger import quiet_writer_thread_errors
from trainer.report.run_report import is_per_class
from trainer.report.tracker import Trackers
from trainer.run.checkpoint import GROUPS, PRESET_GROUPS
from trainer.run.discovery import find_unfinished_run
from trainer.run.files import discard_refused_run
from trainer.system import resolve_device

log = logging.getLogger("train")


def setup(cfg: DictConfig, run_dir: Path) -> Trainer:
    """Build everything from `cfg`, in order, and hand it to the Trainer."""
    for path in shadowed_options():
        log.warning("%s is not used: the shipped option of the same name comes first; give yours another name",
                    path)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    dist = build(cfg.distributed, device=device)  # under torchrun: joins the job; on CUDA picks cuda:LOCAL_RANK
    device = dist.device
    task = build(cfg.task)  # what is learnt: the targets the data reads, the model's outputs, metrics, pictures
    data = build(cfg.dataset, device=device, seed=cfg.seed, targets=task.targets)
    data.shard(dist.rank, dist.world_size)
    model = build_model(cfg.model, data.in_shape, task.output_size(data.num_classes), train_on=device).to(device)
    loss_fn = build_loss(cfg.loss, data)  # loss.class_weights=auto: counted on the training split
    optimizer = build(cfg.optimizer, params=model.parameters())
    scheduler = build(cfg.scheduler, _partial_=True)  # the Trainer binds optimizer and run length
    trackers = {name: build(tracker) for name, tracker in (cfg.get("logger") or {}).items()} if dist.is_main else {}
    logger = functools.partial(Trackers.build, trackers)  # rank 0 alone keeps the run's record
    metrics = build_metrics(cfg.get("metrics"), data.num_classes, device)
    callbacks = {name: build(callback) for name, callback in (cfg.get("callbacks") or {}).items()}
    resume = cfg.trainer.resume
    if resume == "auto" and dist.is_main:
        resume = find_unfinished_run(Path(cfg.output_root), list(HydraConfig.get().overrides.task),
                                     cfg.trainer.checkpoint_dir)
        log.info("trainer.resume=auto: %s", f"continuing {resume}" if resume else "no unfinished run with these "
                 f"overrides under {cfg.output_root}; starting a new run")
    # Hydra made a run directory in rank 0 only (see worker_hydra_overrides); every rank continues rank 0's run.
    run_dir, resume = dist.broadcast_object((run_dir, resume))
    settings = {**OmegaConf.to_container(cfg.trainer, resolve=True, enum_to_str=True),
                "resume": str(resume) if resume else None}
    trainer = Trainer(model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, data=data, logger=logger,
                      run_dir=run_dir, options=TrainerOptions.from_settings(settings), device=device, dist=dist,
                      metrics=metrics, callbacks=callbacks,
                      config_yaml=OmegaConf.to_yaml(cfg, resolve=True), config_choices=option_names(), task=task)
    cores = torch.get_num_threads()
    threads = f" ({cores} CPU thread{'s' * (cores != 1)})" if device.type == "cpu" else ""  # joblib sweeps share cores
    log.info("%s on %s%s: %s%s, %s, %s, %d train / %d val / %d test images; run dir %s", type(model).__name__,
             device, threads, printable(data.name), "" if task.name == "classification" else f" (task {task.name})",
             type(loss_fn).__name__, type(optimizer).__name__,
             data.train.num_samples,
             data.val.num_items, data.test.num_items, trainer.run_dir)
    limits = {"each epoch trains on": cfg.trainer.limit_train_batches,
              "val and test use": cfg.trainer.limit_eval_batches}
    if any(limits.values()):  # the counts above are the splits', not what this run reads of them
        log.info("limited: %s", "; ".join(f"{what} the first {n} batch{'es' * (n != 1)}"
                                          for what, n in limits.items() if n))
    if data.folds is not None:
        log.info("k-fold: fold %d of dataset.folds=%d validates (%s, split_seed %d); the other %d train; the test "
                 "split is every fold's", data.folds.fold, data.folds.folds,
                 "stratified by class" if data.targets == "class" else "not stratified: the targets are not classes",
                 data.split_seed, data.folds.folds - 1)
    if data.sampler == "balanced":
        log.info("dataset.sampler=balanced: each epoch draws %d training images with replacement, every class "
                 "equally likely", data.train.num_items)
    weights = getattr(loss_fn, "class_weights", None)
    if weights is not None:
        log.info("class weights (loss.class_weights=%s): %s", "auto, inverse frequency in the training split"
                 if cfg.loss.class_weights == "auto" else "as given", ", ".join(
                     f"{printable(name)} {w:.3g}" for name, w in zip(data.classes, weights)))
    if cfg.trainer.ema_decay is not None:
        log.info("EMA of the weights, decay %g%s: validation, test and best.pt use the average", cfg.trainer.ema_decay,
                 " with warm-up" if cfg.trainer.ema_warmup else "")
    if dist.active:
        log.info("%d process%s (%s): each trains on batches of %d, %d together; the learning rate is not scaled "
                 "for that (set optimizer.lr yourself)", dist.world_size, "es" * (dist.world_size != 1), dist.backend,
                 data.train.batch_size, data.train.global_batch_size)
    return trainer


def option_names() -> dict[str, str | None]:
    """The option chosen in each config group (`model: cnn`, ...), which checkpoints store: eval, predict and export
    rebuild from these options (shipped, or --config-dir's), never from classes named in a file."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {group: choices.get(group) for group in GROUPS + PRESET_GROUPS}


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Fit, then return the test metrics of the best checkpoint and `best/<monitor>`, the best validation value.
    A run refused while it is set up (a bad value, a missing file, Ctrl-C) leaves no run directory behind."""
    trainer = None
    try:
        given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []  # benchmark.py: no Hydra
        check_keys(cfg, TrainKeys, given)  # the groups' keys were type-checked as Hydra composed them
        trainer = setup(cfg, run_dir)
        if cfg.optimized_metric is not None and cfg.optimized_metric not in trainer.result_keys:
            # Checked before training: a typo would otherwise cost every trial of a sweep a full run.
            named = [k for k in trainer.result_keys if not is_per_class(k)]
            raise UserError(f"optimized_metric={cfg.optimized_metric}: must be one of {', '.join(named)} or a "
                            f"per-class test/<metric>/<class> (best/ follows trainer.monitor={trainer.monitor})")
    except BaseException:
        if trainer is not None:  # TensorBoard's writer thread would write its queued events into a removed directory
            trainer.logger.close()
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN and rank_from_env() == 0:
            discard_refused_run(run_dir, Path(cfg.output_root))  # a sweep keeps its failed job (summarize.py)
        raise
    best = trainer.fit()
    results = {**trainer.test(), **best}
    return {key: results[key] for key in trainer.result_keys}


@hydra.main(version_base="1.3", config_path=CONFIG_SOURCE, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the result named by `optimized_metric` (for a sweeper such as Optuna's), else None."""
    try:
        results = train(cfg, Path(HydraConfig.get().runtime.output_dir))
        return None if cfg.optimized_metric is None else results[cfg.optimized_metric]
    except TrainingInterrupted as e:
        if rank_from_env() == 0:
            print(f"{e}\n{resume_hint(e.checkpoint)}", file=sys.stderr)
            to_log_file(f"{e}; {resume_hint(e.checkpoint)}")
        sys.exit(128 + e.signum)  # the shell's convention for "killed by this signal"
    except (UserError, NonFiniteLossError, MissingMandatoryValue, RuntimeError, KeyboardInterrupt) as e:
        message = failure_line(e, cfg.distributed.timeout_s)
        if message is None:
            raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(message, file=sys.stderr)
    to_log_file(message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # An exception, not an exit: Hydra marks this job failed, runs the rest of the sweep, then reports it.
        raise JobFailed(message.removeprefix("error: "))
    sys.exit(1)


def failure_line(error: BaseException, timeout_s: float) -> str | None:
    """The one line (`error: ...`) a run that failed this way prints, or None for an error of the code's own (its
    traceback is printed instead). `timeout_s`: distributed.timeout_s, for the message of a lost rank."""
    if isinstance(error, (UserError, NonFiniteLossError)):
        return error_line(error)
    if isinstance(error, MissingMandatoryValue):
        return (f"error: config value {error.full_key} is required (it is ??? in the config); set it with "
                f"{error.full_key}=...")
    if isinstance(error, KeyboardInterrupt):  # before the Trainer handles signals: while the run is set up
        return "error: interrupted before training started; nothing of this run was kept"
    lost = lost_peer_message(error, timeout_s) if isinstance(error, RuntimeError) else None
    return None if lost is None else f"error: {lost}"  # another rank died: no traceback of our own


def to_log_file(message: str) -> None:
    """`message` in the run's train.log too (the console has it already): a directory that is kept, a diverged
    run's or a failed sweep job's, then says why it ended."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None))


def resume_hint(checkpoint: Path | None) -> str:
    """The command that continues this run from `checkpoint`, as the user started it."""
    if checkpoint is None:
        return "nothing to resume: run the same command again to start over"
    again = [o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume=")]
    again.append(f"trainer.resume={override_value(str(checkpoint))}")
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "1")  # set by torchrun
    return f"resume with: {command_line(f'--nproc_per_node={per_node}' if world_size_from_env() > 1 else None)} " \
           f"{shlex.join(again)}"


def override_value(text: str) -> str:
    """`text` as the value of a Hydra override, quoted where Hydra's grammar would read it otherwise (a sweep
    job's directory, `0_model=mlp,optimizer=sgd`, holds `=` and `,`)."""
    if re.fullmatch(r"[\w/.\-+:@~%$*?]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class JobFailed(Exception):
    """One job of a sweep failed on a user error (already printed)."""


def run() -> None:
    """The command (`htt-train`, `python train.py`), once trainer.cli.entry has prepared the process."""
    sys.argv += worker_hydra_overrides()  # under torchrun, ranks other than 0 make no run directory
    prepare_hydra()  # ${root_dir:} and the schemas, which configs/train.yaml uses: before @hydra.main composes it
    quiet_writer_thread_errors()  # a full disk: one line from the logger, not the writer thread's traceback
    # without the interpreter's 0.8 s teardown of torch (trainer/cli/process.py)
    run_then_exit(with_one_line_errors(main))
