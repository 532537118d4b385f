"""The open edges: callbacks (named events, their state across a resume), trackers (a list of them: CSV, a user's
own) and metrics a user picks, from a user's folder with the code docs/callbacks.md and docs/tracking.md show."""

import csv
import json
import os
import signal

import pytest
import torch
from conftest import MLP, REPO, TINY, run_train, run_train_stopping, train_in_process
from test_mlflow import runs as mlflow_runs
from test_mlflow import steps as mlflow_steps
from test_mlflow import store as mlflow_store
from test_resume import assert_same_run, final

from trainer.errors import UserError
from trainer.loop.callbacks import Callback, Callbacks
from trainer.report.csv_logger import CSVLogger
from trainer.report.tracker import Tracker, Trackers


def fenced(doc: str, first_line: str) -> str:
    """The fenced block of docs/`doc` whose first line is `first_line`: the docs' own example, run as written."""
    text = (REPO / "docs" / doc).read_text()
    start = text.index("\n" + first_line + "\n") + 1
    return text[start:text.index("```", start)]


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """docs/callbacks.md's StepCounter and docs/tracking.md's JSONLines, each a module and a config option."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "my_callbacks.py").write_text(fenced("callbacks.md", "# my_callbacks.py"))
    (folder / "my_trackers.py").write_text(fenced("tracking.md", "# my_trackers.py"))
    (folder / "configs" / "callbacks").mkdir(parents=True)
    (folder / "configs" / "logger").mkdir()
    (folder / "configs" / "callbacks" / "step_counter.yaml").write_text(
        fenced("callbacks.md", "# @package callbacks.step_counter"))
    (folder / "configs" / "logger" / "jsonl.yaml").write_text(fenced("tracking.md", "# @package logger.jsonl"))
    return folder


# MLP with dropout (draws from the RNG), 16 batches an epoch, checkpoints every 3 steps, train/loss every 5 (sent
# to MLflow at once: flush_secs=0), so a kill at step 21 leaves a checkpoint at 18 and step 20 already in MLflow.
EXACT = (*TINY, *MLP, "model.dropout=0.2", "trainer.deterministic=true", "trainer.max_epochs=2",
         "trainer.checkpoint_every_n_steps=3", "logger=[tensorboard,csv,jsonl,mlflow]", "logger.mlflow.flush_secs=0",
         "callbacks=[step_counter,keep_checkpoints]", "metrics=[cohen_kappa]")


def user_args(folder, root, run_dir, *more):
    return ["--config-dir", str(folder / "configs"), *EXACT, f"dataset.root={root}", f"hydra.run.dir={run_dir}",
            f"output_root={run_dir.parent / 'outputs'}", *more]  # MLflow's store: <output_root>/mlflow.db


def table(run_dir):
    """metrics.csv without the wall-clock columns, which differ between any two runs."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in ("epoch/time_s", "epoch/samples_per_s")} for row in rows]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_exactly_with_callbacks_trackers_and_metrics(user_folder, tiny_root,
                                                                                      tmp_path):
    # the user's modules, importable as from their folder
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(user_folder), os.environ.get("PYTHONPATH")]))}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_train(*user_args(user_folder, tiny_root, straight), env=env)
    assert done.returncode == 0, done.stderr
    result = run_train_stopping(*user_args(user_folder, tiny_root, killed),
                                env={**env, "STOP_AT_STEP": "21", "STOP_SIGNAL": str(int(signal.SIGKILL))})
    assert result.returncode == -signal.SIGKILL
    saved = final(killed)
    assert saved["global_step"] == 18 and saved["callbacks"]["step_counter"]["steps"] == 18
    client = mlflow_store(tmp_path / "outputs")
    (run,) = [r for r in mlflow_runs(client) if r.info.run_name == "killed"]
    assert saved["trackers"]["mlflow"] == {"run_id": run.info.run_id} and run.info.status == "RUNNING"
    assert mlflow_steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20]  # 20: after the checkpoint
    resumed = run_train(*user_args(user_folder, tiny_root, tmp_path / "again",
                                   f"trainer.resume={killed}/checkpoints/last.pt"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, killed)
    # one MLflow run, continued and FINISHED, each step of train/loss once (step 20 was not sent again)
    (again,) = [r for r in mlflow_runs(client) if r.info.run_name == "killed"]
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert mlflow_steps(client, run.info.run_id, "train/loss") == list(range(5, 32, 5))
    assert "test/cohen_kappa" in again.data.metrics and again.data.params["model"] == "MLP"
    assert {"best.pt", "metrics.json", "model_summary.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "alembic" not in resumed.stderr + result.stderr  # the store's creation stays off the console
    assert "config changed" not in resumed.stdout + resumed.stderr  # nothing of the trackers differs on resume
    # the callback's state went through the checkpoint: it counted all 32 steps, not the 14 after the resume
    counted = [json.loads((d / "step_counter.json").read_text()) for d in (straight, killed)]
    assert counted[0] == counted[1] and counted[0]["steps"] == 32
    # metrics.csv: each logged step once, in order, the same values as the run that never stopped
    rows = table(killed)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and rows == table(straight)
    assert {"train/acc_top5", "val/balanced_acc", "val/cohen_kappa", "test/auroc", "test/ece", "test/f1/0",
            "test/auroc/9", "best/val/acc"} <= rows[-1].keys()  # per class too: the test's metrics all go out
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["test/cohen_kappa"] == json.loads((straight / "metrics.json").read_text())["test/cohen_kappa"]
    # the user's own tracker got the run's scalars, each step of each once across the kill (its purge_step lines)
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    logged = [(key, line["step"]) for line in lines for key in line if key != "step"]
    assert len(logged) == len(set(logged)) and {("val/acc", 32), ("test/acc", 32), ("train/loss", 20)} <= set(logged)
    # keep_checkpoints kept every epoch
    assert sorted(p.name for p in (killed / "checkpoints").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    epoch_2 = torch.load(killed / "checkpoints" / "epoch_002.pt", weights_only=True)
    assert epoch_2["epoch"] == 2 and epoch_2["batch_in_epoch"] == 0


def test_monitor_names_any_validation_metric_and_refuses_one_validation_does_not_measure(tiny_root, tmp_path):
    base = (*TINY, *MLP, f"dataset.root={tiny_root}", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "scheduler=none")
    refused = train_in_process(*base, f"hydra.run.dir={tmp_path / 'a'}", "trainer.monitor=val/auroc")
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: trainer.monitor=val/auroc: validation does not measure it")
    assert "trainer.full_val_metrics=true" in refused.stderr and not (tmp_path / "a").exists()
    typo = train_in_process(*base, f"hydra.run.dir={tmp_path / 'b'}", "trainer.monitor=val/acc_top3")
    assert "use one of val/loss, val/acc, val/f1, val/balanced_acc, val/acc_top5" in typo.stderr
    done = train_in_process(*base, f"hydra.run.dir={tmp_path / 'c'}", "trainer.monitor=val/auroc/3",
                            "trainer.full_val_metrics=true")
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "c" / "checkpoints" / "best.pt", weights_only=True)
    assert state["monitor"] == "val/auroc/3" and 0.5 < state["best_metric"] <= 1
    assert "best/val/auroc/3" in json.loads((tmp_path / "c" / "metrics.json").read_text())


def test_an_option_of_the_metrics_group_that_is_no_metric_is_refused_in_one_line(tiny_root, tmp_path):
    result = train_in_process(*TINY, *MLP, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / 'r'}",
                              "metrics=[cohen_kappa]", "+metrics.cohen_kappa.weights=cubic")
    assert result.returncode == 1 and result.stderr.startswith("error: metrics.cohen_kappa: "), result.stderr
    assert "MulticlassCohenKappa(weights=cubic) refused its settings" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_callbacks_call_only_those_that_take_the_event():
    calls = []

    class Stepper(Callback):
        def on_step_end(self, trainer):
            calls.append(("step", trainer))

    callbacks = Callbacks({"a": Stepper(), "b": Callback()})
    callbacks.on_step_end("T")
    callbacks.on_fit_start("T")
    assert calls == [("step", "T")]
    assert Callbacks([Callback()]).on_step_end.__name__ == "_nothing"  # no callback takes it: nothing runs per step
    with pytest.raises(UserError, match=r"callbacks.x: its class str is not a subclass of trainer.loop.callbacks"):
        Callbacks({"x": "nope"})
    assert Callbacks({"a": Stepper()}).load_state_dict({"gone": {"n": 1}}) == ["gone"]


def test_csv_rows_merge_per_step_and_a_resume_drops_the_rows_after_its_checkpoint(tmp_path):
    log = CSVLogger(tmp_path)
    log.log_metrics({"train/loss": 1.5}, 5)
    log.log_metrics({"train/loss": 1.25}, 10)
    log.log_metrics({"val/acc": 0.5}, 10)  # the epoch's metrics at the step of its last train/loss
    log.log_metrics({"train/loss": 1.0}, 15)  # logged after the checkpoint at step 10, then killed
    log.close()
    assert (tmp_path / "metrics.csv").read_text() == "step,train/loss,val/acc\n5,1.5,\n10,1.25,0.5\n15,1.0,\n"
    resumed = CSVLogger(tmp_path, purge_step=11)
    resumed.log_metrics({"train/loss": 1.0, "lr": 0.1}, 15)
    resumed.close()
    assert (tmp_path / "metrics.csv").read_text() == "step,train/loss,val/acc,lr\n5,1.5,,\n10,1.25,0.5,\n15,1.0,,0.1\n"


@pytest.mark.parametrize("text", ["loss,step\n1,2\n", "step,a\nx,1\n", "step,a\n1,2,3\n", "step,a,a\n"])
def test_a_metrics_csv_that_is_not_this_loggers_is_refused_in_one_line_on_resume(tmp_path, text):
    (tmp_path / "metrics.csv").write_text(text)
    with pytest.raises(UserError, match=r"cannot resume .*metrics.csv: .* move (it|the file) away"):
        CSVLogger(tmp_path, purge_step=3)


def test_trackers_hand_each_call_to_each_and_close_all_when_one_fails(tmp_path):
    seen = []

    class Failing(Tracker):
        def close(self):
            raise OSError("disk gone")

    class Recording(Tracker):
        def log_metrics(self, metrics, step):
            seen.append((metrics, step))

        def close(self):
            seen.append("closed")

        def state_dict(self):
            return {"run": "abc"}

    trackers = Trackers.build({"f": Failing, "r": Recording}, tmp_path, None)
    trackers.log_metrics({"a": 1.0}, 3)
    assert trackers.state_dict() == {"r": {"run": "abc"}}
    with pytest.raises(OSError, match="disk gone"):
        trackers.close()
    assert seen == [({"a": 1.0}, 3), "closed"]


def test_a_checkpoint_config_may_name_a_listed_options_class_but_nothing_deeper(tmp_path):
    import yaml
    from test_checkpoint import STATE

    from trainer.run.checkpoint import load_checkpoint, save_checkpoint

    good = {"logger": {"csv": {"_target_": "trainer.report.csv_logger.CSVLogger", "_partial_": True}},
            "callbacks": {"keep_checkpoints": {"_target_": "trainer.loop.keep_checkpoints.KeepCheckpoints"}}}
    save_checkpoint(tmp_path / "good.pt", {**STATE, "config": yaml.safe_dump(good)})
    assert load_checkpoint(tmp_path / "good.pt")["config"]["logger"] == good["logger"]
    deeper = {"callbacks": {"a": {"b": {"_target_": "os.system"}}}}
    save_checkpoint(tmp_path / "bad.pt", {**STATE, "config": yaml.safe_dump(deeper)})
    with pytest.raises(UserError, match="has the key callbacks.a.b._target_"):
        load_checkpoint(tmp_path / "bad.pt")


def test_keep_checkpoints_keeps_the_newest_n(tmp_path):
    from types import SimpleNamespace

    from trainer.loop.keep_checkpoints import KeepCheckpoints

    keep = KeepCheckpoints(every_n_epochs=1, keep_last=2)
    last = tmp_path / "last.pt"
    for epoch in (1, 2, 3):
        (tmp_path / "new").write_text(f"epoch {epoch}")
        os.replace(tmp_path / "new", last)  # as every checkpoint is written: a new file renamed over the old
        trainer = SimpleNamespace(progress=SimpleNamespace(epoch=epoch, batch_in_epoch=0),
                                  dist=SimpleNamespace(is_main=True))
        keep.on_checkpoint(trainer, last)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_002.pt", "epoch_003.pt"]
    assert (tmp_path / "epoch_002.pt").read_text() == "epoch 2"
    with pytest.raises(UserError, match=r"callbacks.keep_checkpoints.keep_last=0: must be an integer >= 1"):
        KeepCheckpoints(keep_last=0)
