"""logger=mlflow (trainer/report/mlflow_logger.py): what a run logs lands in MLflow's SQLite store or a server, a
resumed run continues its MLflow run with every step once, a checkpoint's run id is checked, and a parallel sweep
makes one parent run with a child per job. Skipped where mlflow is not installed (`pip install '.[mlflow]'`).
A training run killed mid-epoch and resumed, with MLflow among its trackers: tests/test_callbacks_and_trackers.py."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import MLP, REPO, TINY, run_train

from trainer.errors import UserError

needs_mlflow = pytest.mark.skipif(find_spec("mlflow") is None, reason="needs mlflow: pip install '.[mlflow]'")


def store(root: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def runs(client, experiment: str = "train") -> list:
    from mlflow.entities import ViewType

    found = client.get_experiment_by_name(experiment)
    return [] if found is None else list(client.search_runs([found.experiment_id], run_view_type=ViewType.ALL))


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def logger(tmp_path: Path, purge_step: int | None = None, **settings):
    from trainer.report.mlflow_logger import MLflowLogger

    return MLflowLogger(tmp_path / "run", purge_step, output_root=tmp_path, **settings)


def test_importing_the_tracker_does_not_import_mlflow():
    probe = "import sys, trainer.report.mlflow_logger; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, timeout=120).returncode == 0


def test_without_mlflow_the_tracker_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match=r"pip install '\.\[mlflow\]'") as caught:
        logger(tmp_path)
    assert "\n" not in str(caught.value)


@needs_mlflow
def test_params_metrics_texts_pictures_and_files_land_in_the_sqlite_store(tmp_path):
    tracker = logger(tmp_path)
    params = {f"p{i:03d}": i for i in range(150)}  # more than log_batch's 100 params a call
    params.update({"flag": True, "long": "x" * 7000, "lr": 0.003, "model": "MLP"})
    tracker.log_params(params)
    for step in range(1, 1201):  # 2400 points: more than log_batch's 1000 a call
        tracker.log_metrics({"train/loss": 1 / step, "lr": 0.1}, step)
    tracker.log_text("model", "layer  type\n")
    tracker.log_text("config", "seed: 1\n")
    tracker.log_image("val/confusion_matrix", torch.zeros(3, 8, 8, dtype=torch.uint8), 1200)
    tracker.log_confusion_matrix("test/confusion_matrix_counts", torch.eye(2, dtype=torch.long), ["a", "b"], 1200)
    (tmp_path / "metrics.json").write_text("{}")
    tracker.log_artifact(tmp_path / "metrics.json")
    tracker.log_metrics({"test/acc": 0.9, "test/acc_class/3": 0.5}, 1200)  # `/` in keys, as the report names them
    tracker.log_hparams(params, {"test/acc": 0.9}, 1200)  # the end: the metrics went out through log_metrics
    tracker.close()

    client = store(tmp_path)
    (run,) = runs(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert len(run.data.params) == 154 and run.data.params["flag"] == "true" and run.data.params["lr"] == "0.003"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, 1201))
    assert run.data.metrics["test/acc_class/3"] == 0.5 and run.data.metrics["test/acc"] == 0.9
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "config.yaml", "metrics.json", "images", "test"} <= files, files
    pictures = client.list_artifacts(run.info.run_id, "images/val/confusion_matrix")
    assert [a.path for a in pictures] == ["images/val/confusion_matrix/step_00001200.png"]


@needs_mlflow
def test_a_resumed_run_continues_its_mlflow_run_with_every_step_once(tmp_path):
    first = logger(tmp_path, flush_secs=0)  # sends at once: the interrupted run sends steps after its checkpoint
    first.log_params({"seed": 1})
    for step in range(1, 7):
        first.log_metrics({"train/loss": float(step)}, step)
    state = first.state_dict()  # the checkpoint at step 6
    first.flush()
    for step in range(7, 11):  # sent, then the process dies: no close()
        first.log_metrics({"train/loss": float(step)}, step)
    run_id = state["run_id"]
    assert runs(store(tmp_path))[0].info.status == "RUNNING"

    resumed = logger(tmp_path, purge_step=7, flush_secs=0)
    resumed.load_state_dict(state)
    for step in range(7, 16):
        resumed.log_metrics({"train/loss": float(step)}, step)
    resumed.log_hparams({"seed": 1}, {"test/acc": 1.0}, 15)
    resumed.close()

    client = store(tmp_path)
    (run,) = runs(client)  # the same run, no second one
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 16)]


@needs_mlflow
@pytest.mark.parametrize("run_id", ["../../../etc/passwd", "ABCDEF0123456789ABCDEF0123456789", 42, "x' or '1'='1",
                                    "0123456789abcdef0123456789abcdef"])
def test_a_checkpoints_run_id_is_checked_and_refused_in_one_line(tmp_path, run_id):
    tracker = logger(tmp_path)
    with pytest.raises(UserError) as caught:
        tracker.load_state_dict({"run_id": run_id})
    message = str(caught.value)
    assert "\n" not in message and "MLflow run" in message, message
    if isinstance(run_id, str) and len(run_id) == 32 and run_id.islower():  # well-formed, but no such run
        assert "is not in sqlite:///" in message and "logger.mlflow.tracking_uri" in message
    else:
        assert "not an MLflow run id" in message
    tracker.close()
    assert runs(store(tmp_path)) == []  # nothing was created


@needs_mlflow
def test_a_deleted_run_is_not_resumed_silently(tmp_path):
    first = logger(tmp_path)
    state = first.state_dict()
    store(tmp_path).delete_run(state["run_id"])
    with pytest.raises(UserError, match=f"was deleted in .*mlflow runs restore --run-id {state['run_id']}"):
        logger(tmp_path, purge_step=5).load_state_dict(state)


@needs_mlflow
def test_a_run_closed_before_its_end_is_never_finished(tmp_path):
    refused = logger(tmp_path)
    refused.log_params({"seed": 1})
    refused.close()  # refused before its first checkpoint: nothing can resume it
    stopped = logger(tmp_path)
    stopped.log_metrics({"train/loss": 1.0}, 1)
    stopped.state_dict()
    stopped.close()
    statuses = {r.info.run_id: (r.info.status, r.info.lifecycle_stage) for r in runs(store(tmp_path))}
    assert statuses == {refused.run_id: ("RUNNING", "deleted"), stopped.run_id: ("KILLED", "active")}


def test_the_config_types_its_keys():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from trainer.cli.config_errors import config_error_line
    from trainer.cli.schema import MLflowLoggerSettings

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=[tensorboard,mlflow]"])
        assert list(cfg.logger) == ["tensorboard", "mlflow"]
        assert OmegaConf.get_type(cfg.logger.mlflow) is MLflowLoggerSettings
        assert cfg.logger.mlflow.tracking_uri is None
        with pytest.raises(ConfigCompositionException) as caught:
            compose("train", overrides=["logger=mlflow", "logger.mlflow.flush_secs=abc"])
    assert config_error_line(caught.value) == "logger.mlflow.flush_secs=abc: must be a number"


# ---- training runs ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, with its own SQLite store and artifact folder under `tmp_path`."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "sqlalchemy2_names")}  # see its docstring
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                                   str(tmp_path / "server_artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"], cwd=tmp_path, env=env, stdout=log, stderr=log)
    return server, f"http://127.0.0.1:{port}"


@needs_mlflow
def test_train_logs_to_an_mlflow_server(tiny_root, tmp_path):
    server, url = start_server(tmp_path)
    try:
        deadline = time.monotonic() + 120  # it starts in about 20 s
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        out = tmp_path / "outputs"
        result = run_train(*TINY, *MLP, f"dataset.root={tiny_root}", f"output_root={out}", "trainer.max_epochs=1",
                           "scheduler=none", "logger=mlflow", f"logger.mlflow.tracking_uri={url}",
                           "logger.mlflow.experiment_name=server_test")
        assert result.returncode == 0, result.stderr[-2000:]
        assert not (out / "mlflow.db").exists()  # the server keeps it all

        experiment = api(url, "experiments/get-by-name?experiment_name=server_test")["experiment"]
        found = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(found) == 1 and found[0]["info"]["status"] == "FINISHED"
        run_id = found[0]["info"]["run_id"]
        params = {p["key"]: p["value"] for p in found[0]["data"]["params"]}
        assert params["model"] == "MLP" and params["optimizer"] == "Adam"
        history = api(url, f"metrics/get-history?run_id={run_id}&metric_key=train/loss")["metrics"]
        assert sorted(m["step"] for m in history) == [5, 10, 15] and all(m["value"] > 0 for m in history)
        files = api(url, f"artifacts/list?run_id={run_id}")["files"]
        assert {"best.pt", "metrics.json", "config.yaml"} <= {f["path"] for f in files}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@needs_mlflow
def test_a_parallel_sweep_is_one_parent_run_with_a_finished_child_per_job(tiny_root, tmp_path):
    out = tmp_path / "outputs"
    result = run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", *TINY, *MLP,
                       f"dataset.root={tiny_root}", f"output_root={out}", "trainer.max_epochs=1", "scheduler=none",
                       "logger=mlflow", "seed=1,2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    found = runs(store(out))
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    (parent,) = parents
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(found) == 4 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in found), [(r.info.run_name, r.info.status) for r in found]
    assert parent.info.run_name.startswith("multirun/")
    assert sorted(r.data.params["seed"] for r in children) == ["1", "2", "3"]
    assert sorted(r.info.run_name.split("_")[0] for r in children) == ["0", "1", "2"]  # <n>_<overrides>
    assert all(r.data.tags["trainer.run_dir"].startswith(str(out / parent.info.run_name)) for r in children)
