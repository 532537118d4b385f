"""`logger=mlflow`: the run's parameters, metrics and files in an MLflow tracking store.

By default the store is a SQLite database beside the runs, `<output_root>/mlflow.db`, with the files (artifacts)
in `<output_root>/mlartifacts`; `logger.mlflow.tracking_uri=http://host:5000` logs to a server instead. Only this
module's classes import mlflow, and only when built: the default run (`logger=tensorboard`) never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from trainer.errors import OutputError, UserError, one_line
from trainer.report.tracker import Tracker

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow's stores issue (uuid4().hex)
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH: a longer value is refused
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
MAX_PARAMS_PER_CALL, MAX_METRICS_PER_CALL = 100, 1000  # log_batch's limits (MAX_PARAMS_TAGS_PER_BATCH, ...)
SWEEP_TAG = "trainer.sweep"  # on a sweep's parent run: a digest of the sweep directory, the key its jobs find it by
RUN_DIR_TAG = "trainer.run_dir"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child run under its parent


class MLflowLogger(Tracker):
    """Parameters, scalars, texts, pictures and files of one run, as one MLflow run.

    `tracking_uri`: None for SQLite at `<output_root>/mlflow.db` (artifacts in `<output_root>/mlartifacts`), else
    any URI MLflow takes (`http://host:5000`: the server keeps the artifacts). `output_root` defaults to the run
    directory's parent. `run_name`: None names the run by its directory, relative to `output_root` (a sweep's job:
    to the sweep's directory, `<n>_<overrides>`). `sweep_dir`: in a job of a sweep, the sweep's directory (the
    config passes `${sweep_dir:}`, null in a single run): the run becomes a child of the sweep's one parent run
    (named by the sweep's directory), found by a tag (a digest of `sweep_dir`) or created under a file lock
    (`<output_root>/mlflow.lock`), so parallel jobs (joblib, SLURM on a shared disk) make one parent.

    Metrics are kept in memory and sent in batches at `flush()` (after each checkpoint), at `close()`, and while
    logging at most every `flush_secs`.

    Resume: the checkpoints store the run id (`state_dict()`); `load_state_dict()` continues that run. MLflow
    cannot delete a metric's points, and the interrupted run may have sent steps after its checkpoint (the
    `flush_secs` sends, the test's metrics). So on resume the logger reads which (key, step) pairs the run already
    holds and never sends those again: every step shows once. A resume is bit-exact, so the point kept is the
    one the resumed run would log (timings such as `epoch/time_s` aside). The other way, sending only at
    checkpoints, would leave MLflow's charts up to 30 epochs behind and still double the test's metrics.

    Status: `close()` after `log_hparams` (the end of the test) marks the run FINISHED; a `close()` before it (a
    run refused before training) deletes the run if no checkpoint names it, else marks it KILLED. A run stopped
    by a signal or a kill is not closed: it stays RUNNING, as it is for MLflow until the resume continues it.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, *, tracking_uri: str | None = None,
                 experiment_name: str = "train", run_name: str | None = None,
                 output_root: str | Path | None = None, sweep_dir: str | Path | None = None,
                 flush_secs: float = 30) -> None:
        super().__init__(log_dir, purge_step)
        try:
            import mlflow
        except ImportError:
            raise UserError("logger=mlflow needs the mlflow package: pip install '.[mlflow]' (or pip install "
                            "'mlflow>=3')") from None
        self.output_root = Path(output_root).expanduser().resolve() if output_root else \
            self.log_dir.resolve().parent
        self.local = not tracking_uri  # the default store: SQLite, artifacts beside it
        self.tracking_uri = tracking_uri or f"sqlite:///{self.output_root / 'mlflow.db'}"
        self.run_name, self.flush_secs = run_name, flush_secs
        self.sweep_dir = Path(sweep_dir).expanduser().resolve() if sweep_dir else None
        self.run_id: str | None = None
        self.pending: list = []  # Metric entities not yet sent
        self.present: set[tuple[str, int]] = set()  # (key, step) pairs a resumed run already holds
        self.finished = self.checkpointed = self.closed = False
        self.sent_at = time.monotonic()
        self.output_root.mkdir(parents=True, exist_ok=True)
        with self._locked(), self._store("open the store"):
            # Under the lock: parallel jobs creating the SQLite tables, or the experiment, at once would collide.
            with _quiet_migrations():
                self.client = mlflow.MlflowClient(self.tracking_uri)  # its own: no process-wide run or URI
                experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                location = (self.output_root / "mlartifacts").as_uri() if self.local else None
                self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
            else:
                self.experiment_id = experiment.experiment_id

    # ---- the run ----------------------------------------------------------------------------------------------

    @property
    def run(self) -> str:
        """This run's id, the run created at first use (a resumed run's id is set before anything is logged)."""
        if self.run_id is None:
            parent = self._parent() if self.sweep_dir is not None else None
            name = self.run_name or self._relative(self.log_dir, self.sweep_dir)  # a job: `<n>_<overrides>`
            tags = {RUN_DIR_TAG: str(self.log_dir.resolve()), **({PARENT_TAG: parent} if parent else {})}
            with self._store("create a run"):
                self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        return self.run_id

    def _relative(self, path: Path, under: Path | None = None) -> str:
        """`path` relative to `under` (else output_root) where it lies inside, else its last part."""
        path, under = path.resolve(), under or self.output_root
        return str(path.relative_to(under)) if path.is_relative_to(under) else path.name

    def _parent(self) -> str:
        """The sweep's parent run, created by the first job that asks; RUNNING again while a job runs."""
        digest = hashlib.sha256(str(self.sweep_dir).encode()).hexdigest()[:32]
        with self._locked(), self._store("find the sweep's parent run"):
            found = self.client.search_runs([self.experiment_id], f"tags.`{SWEEP_TAG}` = '{digest}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
            tags = {SWEEP_TAG: digest, RUN_DIR_TAG: str(self.sweep_dir)}
            return self.client.create_run(self.experiment_id, tags=tags,
                                          run_name=self._relative(self.sweep_dir)).info.run_id

    def _end_parent(self) -> None:
        """A sweep's parent is FINISHED once none of its jobs is RUNNING (jobs may run in parallel)."""
        with self._locked(), self._store("end the sweep's parent run"):
            parent = self.client.get_run(self.run).data.tags.get(PARENT_TAG)
            if parent is None:
                return
            running = self.client.search_runs(
                [self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'")
            if not [r for r in running if r.info.run_id != self.run]:
                self.client.set_terminated(parent, "FINISHED")

    def state_dict(self) -> dict[str, Any]:
        self.checkpointed = True
        return {"run_id": self.run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpoint's run. The id comes from a file: checked before it reaches a query."""
        run_id = state.get("run_id")
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            shown = repr(run_id)[:60]
            raise UserError(f"the checkpoint's MLflow run id {shown} is not an MLflow run id (32 lowercase hex "
                            "digits); this checkpoint was not written by logger=mlflow")
        from mlflow.exceptions import MlflowException

        with self._store("read the checkpoint's run"):
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # a server that does not answer: not the checkpoint's fault
                raise UserError(f"the checkpoint's MLflow run {run_id} is not in {self.tracking_uri}: set "
                                "logger.mlflow.tracking_uri to the store the run logged to") from None
        if run.info.lifecycle_stage != "active":
            raise UserError(f"the checkpoint's MLflow run {run_id} was deleted in {self.tracking_uri}: restore it "
                            f"(mlflow runs restore --run-id {run_id}) to log on to it")
        self.run_id, self.checkpointed = run_id, True
        with self._store("read the run's metrics"):
            # what the interrupted run sent, after its checkpoint too: never sent twice (see the class docstring)
            self.present = {(key, m.step) for key in run.data.metrics
                            for m in self.client.get_metric_history(run_id, key)}
            if run.info.status != "RUNNING":  # a finished run extended (more epochs), or one ended KILLED
                self.client.update_run(run_id, status="RUNNING")

    # ---- what the run logs --------------------------------------------------------------------------------------

    def log_params(self, params: dict[str, str | int | float | bool]) -> None:
        from mlflow.entities import Param

        entities = []
        for key, value in params.items():
            if len(key) > MAX_KEY:  # cut, two keys could become one: MLflow refuses a param logged twice
                log.warning("MLflow: parameter %s... not logged: its name is longer than %d", key[:40], MAX_KEY)
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            if len(text) > MAX_PARAM_VALUE:
                text = text[:MAX_PARAM_VALUE - 3] + "..."
            entities.append(Param(key, text))
        with self._store("log the parameters"):
            for i in range(0, len(entities), MAX_PARAMS_PER_CALL):
                self.client.log_batch(self.run, params=entities[i:i + MAX_PARAMS_PER_CALL], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(step)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()
                         if (key, step) not in self.present]
        if time.monotonic() - self.sent_at > self.flush_secs:
            self.flush()

    def log_hparams(self, hparams: dict[str, str | int | float | bool], metrics: dict[str, float], step: int) -> None:
        """The run's end: its final metrics were logged (`log_metrics`) and its hyperparameters are its params."""
        self.finished = True

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        name = {"model": "model_summary.txt", "config": "config.yaml"}.get(tag, f"{_file_name(tag)}.txt")
        with self._store(f"store {name}"):
            self.client.log_text(self.run, text, name)

    def log_images(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        from trainer.report.figures import image_grid

        self.log_image(tag, image_grid(images), step)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A PNG artifact, `images/<tag>/step_<step>.png`: a resumed run's picture of a step replaces the file."""
        from PIL import Image

        array = image.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
        if array.shape[2] == 1:
            array = array[:, :, 0]
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        self._log_bytes(buffer.getvalue(), f"images/{_file_name(tag)}/step_{int(step):08d}.png")

    def log_confusion_matrix(self, tag: str, confusion: torch.Tensor, classes: Sequence[str], step: int) -> None:
        counts = {"step": int(step), "classes": list(classes), "counts": confusion.tolist()}
        self._log_bytes(json.dumps(counts).encode(), f"{_file_name(tag)}.json")

    def _log_bytes(self, data: bytes, artifact: str) -> None:
        """`data` as the artifact file `artifact` (a relative path, `/`-separated)."""
        import tempfile

        folder, _, name = artifact.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp, self._store(f"store {artifact}"):
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run, str(path), folder or None)

    def log_artifact(self, path: Path) -> None:
        with self._store(f"store {path.name}"):
            self.client.log_artifact(self.run, str(path))

    # ---- sending ------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, []
            with self._store("log the metrics"):
                for i in range(0, len(pending), MAX_METRICS_PER_CALL):
                    self.client.log_batch(self.run, metrics=pending[i:i + MAX_METRICS_PER_CALL], synchronous=True)
        self.sent_at = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.run_id is None:  # nothing was logged: no run was made
            return
        self.flush()
        with self._store("end the run"):
            if self.finished:
                self.client.set_terminated(self.run_id, "FINISHED")
            elif not self.checkpointed:  # refused before its first checkpoint: nothing can continue it
                self.client.delete_run(self.run_id)
            else:
                self.client.set_terminated(self.run_id, "KILLED")
        if self.finished:
            self._end_parent()

    # ---- helpers ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock among this machine's (and a shared disk's) processes logging under output_root."""
        with open(self.output_root / "mlflow.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _store(self, doing: str) -> Iterator[None]:
        """MLflow's failures (a server down, a locked database) as one line naming the store."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as e:
            message = one_line(str(e)).strip()
            raise OutputError(f"MLflow ({self.tracking_uri}): cannot {doing}: {message[:300]}") from None


def _file_name(tag: str) -> str:
    """A tag (`val/confusion_matrix`) as a relative artifact path: its `/` folders kept, nothing that climbs out."""
    parts = [re.sub(r"[^\w.\-]", "_", part) for part in tag.split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "untitled"


@contextlib.contextmanager
def _quiet_migrations() -> Iterator[None]:
    """The first use of a new SQLite store creates its tables through alembic, which logs a dozen INFO lines
    (`Running upgrade ...`) into the run's console: kept at WARNING for that call only."""
    loggers = [logging.getLogger(name) for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
