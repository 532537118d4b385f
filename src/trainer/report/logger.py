"""The TensorBoard tracker (the default `logger`), and the hyperparameters every tracker is given."""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from pathlib import Path

import torch
import yaml

from trainer.errors import OutputError
from trainer.report.tracker import NullLogger, Tracker
from trainer.run.changes import flatten

log = logging.getLogger(__name__)

# Config groups whose values are a run's hyperparameters, minus where files live.
HPARAM_GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "task")
HISTOGRAM_LIMIT = 1e20  # TensorBoard's largest histogram bucket edge
NOT_HPARAMS = ("dataset.root", "dataset.mirror", "dataset.download", "dataset.verify", "dataset.cache",
               "dataset.device_margin_gib")


def hparams_of(config_yaml: str) -> dict[str, str | int | float | bool]:
    """The flattened hyperparameters of a resolved config, as TensorBoard's HParams tab takes them:
    `model` = "CNN" (the class), `model.channels` = "[32, 64]", `optimizer.lr` = 0.003, `seed`, ..."""
    config = yaml.safe_load(config_yaml) or {}
    found = {f"{group}.{k}" if k else group: v for group in HPARAM_GROUPS if group in config
             for k, v in flatten(config[group]).items()}
    found.update(seed=config.get("seed"), max_epochs=config.get("trainer", {}).get("max_epochs"))
    out: dict[str, str | int | float | bool] = {}
    for key, value in found.items():
        if key in NOT_HPARAMS or value is None:
            continue
        if key.endswith("._target_"):  # "trainer.models.cnn.CNN" -> model = "CNN"
            key, value = key.removesuffix("._target_"), str(value).rsplit(".", 1)[-1]
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def quiet_writer_thread_errors() -> None:
    """Keep the traceback of TensorBoard's writer thread off the console when the disk refuses a write. The main
    thread's next write raises the same OSError, which the logger reports in one line (OutputError). Process
    state, so the command line's edge (train.py) calls it; importing this module changes nothing."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def _one_line_on_write_errors(cls: type) -> type:
    """Every public method of `cls` raises OutputError, naming the log directory, where the disk refuses a write."""
    def wrap(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except OSError as e:
                raise OutputError(f"cannot write TensorBoard events in {self.log_dir}: {e.strerror or e}; the "
                                  "checkpoints written before are intact") from None
        return wrapped

    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, wrap(method))
    return cls


@_one_line_on_write_errors
class TensorBoardLogger(Tracker):
    """Scalars, text, images, histograms and the model graph into a TensorBoard event file under `log_dir`.

    `purge_step`: on resume, TensorBoard hides events from this step on that the interrupted run
    wrote after its checkpoint, so curves have neither duplicated nor missing steps.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import (
            SummaryWriter,  # imports tensorboard: keep it off module import
        )

        super().__init__(log_dir, purge_step)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_hparams(self, hparams: dict[str, str | int | float | bool], metrics: dict[str, float], step: int) -> None:
        """Fill TensorBoard's HParams tab with this run's hyperparameters and its final metrics. The tab reads the
        metrics' (real) values from this run's scalars of the same tags, which `log_metrics` logged at `step`."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):  # experiment, session start, session end
            self.writer.file_writer.add_summary(summary)

    def log_images(self, tag: str, images, step: int = 0) -> None:
        """A grid of uint8 images (N, C, H, W), eight per row."""
        from trainer.report.figures import image_grid

        self.writer.add_image(tag, image_grid(images), step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One picture, (3, H, W) uint8."""
        self.writer.add_image(tag, image, step)

    def log_embedding(self, tag: str, embeddings: torch.Tensor, labels, images: torch.Tensor, step: int) -> None:
        """The projector's points: `embeddings` (N, D), a label each, uint8 thumbnails (N, C, H, W)."""
        self.writer.add_embedding(embeddings.float().cpu(), metadata=list(labels), label_img=images.float() / 255,
                                  global_step=step, tag=tag)

    def log_histograms(self, model: torch.nn.Module, step: int, grad_scale: float = 1.0) -> None:
        """`weights/<name>` and, where a gradient is held, `grads/<name>` (divided by `grad_scale`)."""
        for name, p in model.named_parameters():
            self._histogram(f"weights/{name}", p.detach(), step)
            if p.grad is not None:
                self._histogram(f"grads/{name}", p.grad.detach() / grad_scale, step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        # TensorBoard's buckets end at +-1e20 and it fails on values beyond them ("The histogram is empty"): a
        # run diverging that way (lr=1e30) still has finite weights, and a picture is not worth failing it for.
        if values.numel() and not bool((values.abs() < HISTOGRAM_LIMIT).all()):
            log.warning("%s at step %d not drawn: values beyond +-%g (or not finite)", tag, step, HISTOGRAM_LIMIT)
            return
        self.writer.add_histogram(tag, values, step)

    def log_graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model's graph, traced on `example` in eval mode. A model that cannot be traced is logged as a
        warning: a picture is not worth failing a finished run for."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice: add_graph has no other way
                self.writer.add_graph(model, example)
        except Exception as e:  # noqa: BLE001 (tracing fails in many model-specific ways)
            log.warning("model graph not logged: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        finally:
            model.train(was_training)

    def log_confusion_matrix(self, tag: str, confusion, classes: tuple[str, ...], step: int) -> None:
        """A (classes, classes) count matrix, rows true and columns predicted, as a table in the Text tab."""
        header = "| true \\ predicted | " + " | ".join(classes) + " |\n|" + " --- |" * (len(classes) + 1)
        rows = [f"| **{name}** | " + " | ".join(str(int(n)) for n in row) + " |"
                for name, row in zip(classes, confusion.tolist())]
        self.writer.add_text(tag, "\n".join([header, *rows]), step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Indented by four spaces, TensorBoard's markdown shows it verbatim (YAML keeps its layout).
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def flush(self) -> None:
        """Hand everything logged so far to the OS (it survives a kill of this process)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["NullLogger", "TensorBoardLogger", "hparams_of"]
