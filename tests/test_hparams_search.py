"""`python train.py -m hparams_search=mnist_optuna`: Optuna's sweeper runs real trials, each in its own run
directory, records the best one, and a failing trial is recorded as failed while the study goes on."""

import csv
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from sqlalchemy.exc import MovedIn20Warning

with warnings.catch_warnings():
    # optuna 2.x's database storage uses SQLAlchemy 1.x API that 1.4 warns about; pyproject.toml pins it below 2.
    warnings.simplefilter("ignore", MovedIn20Warning)
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

from conftest import REPO, TINY, run_train

PRESET = REPO / "configs" / "hparams_search" / "mnist_optuna.yaml"
# TINY minus its batch size: a batch size given on the command line would be fixed, not searched.
SMALL = [o for o in TINY if not o.startswith("dataset.batch_size=")]
# One epoch of ~2-8 steps: too short for the default one-cycle warm-up at batch size 256.
SHORT = ("trainer.max_epochs=1", "scheduler=none")


def sweep_dir(out: Path) -> Path:
    (results,) = out.rglob("optimization_results.yaml")
    return results.parent


def trials(sweep: Path) -> list[tuple[Path, dict[str, str]]]:
    """Each trial's run directory and the overrides it ran with, in trial order."""
    runs = sorted((p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")), key=lambda p: int(p.name))
    return [(run, dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra/overrides.yaml").read_text())))
            for run in runs]


def summarize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_the_preset_composes():
    result = run_train("hparams_search=mnist_optuna", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    sweeper = yaml.safe_load(result.stdout)["hydra"]["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "maximize"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 42
    assert sweeper["n_jobs"] == 1 and sweeper["max_failure_rate"] == 1.0 and "optimizer.lr" in sweeper["params"]


def test_an_unknown_optimized_metric_fails_before_training_naming_the_allowed_ones(tiny_root, tmp_path):
    result = run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "optimized_metric=val/acc")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: optimized_metric=val/acc: must be one of test/loss, test/acc, test/f1, test/balanced_acc, "
        "test/acc_top5, test/auroc, test/ece, best/val/acc or a per-class test/<metric>/<class> (best/ follows "
        "trainer.monitor=val/acc)")
    assert not list(tmp_path.rglob("*.pt"))


def test_optuna_sweep_samples_the_space_and_reports_the_best_trial(faint_root, tmp_path):
    out = tmp_path / "outputs"
    result = run_train("-m", "hparams_search=mnist_optuna", *SMALL, *SHORT, f"dataset.root={faint_root}",
                       f"output_root={out}", "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(out)
    runs = trials(sweep)
    assert [run.name for run, _ in runs] == ["0", "1", "2"]  # each trial its own run directory
    values = [json.loads((run / "metrics.json").read_text())["best/val/acc"] for run, _ in runs]
    assert len(set(values)) > 1 and all(0 < v < 1 for v in values)  # real, trial-dependent results

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(values)  # what train.py returned is what metrics.json holds
    _, best_overrides = runs[values.index(max(values))]
    assert {k: str(v) for k, v in results["best_params"].items()} == {k: best_overrides[k]
                                                                       for k in results["best_params"]}

    params = yaml.safe_load(PRESET.read_text())["hydra"]["sweeper"]["params"]
    space, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(results["best_params"]) == set(space)
    for _, overrides in runs:
        for name, distribution in space.items():
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                assert overrides[name] in map(str, distribution.choices), (name, overrides[name])
            else:
                assert distribution.low <= float(overrides[name]) <= distribution.high, (name, overrides[name])
    assert len({overrides["optimizer.lr"] for _, overrides in runs}) == 3  # sampled, not one fixed point

    table = summarize(str(sweep), "--sort", "best/val", "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [r["status"] for r in rows] == ["finished"] * 3 and float(rows[0]["best/val"]) == pytest.approx(max(values))
    assert "optimizer.lr=" in rows[0]["overrides"]


def test_a_failing_trial_is_recorded_as_failed_and_the_study_goes_on(faint_root, tmp_path):
    out = tmp_path / "outputs"
    study_db = tmp_path / "study.db"  # a database storage: optuna 2.x needs SQLAlchemy < 2 for it
    # Only the learning rate is searched, between a value that fails and one that trains; the seeded
    # sampler draws both within three trials.
    result = run_train("-m", "hparams_search=mnist_optuna", *TINY, *SHORT, f"dataset.root={faint_root}",
                       f"output_root={out}", "hydra.sweeper.n_trials=3", "optimizer.lr=0,0.01",
                       "optimizer.weight_decay=0", "model.dropout=0", "model.hidden_sizes=[64]",
                       f"hydra.sweeper.storage=sqlite:///{study_db}", "hydra.sweeper.study_name=failing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error: optimizer.lr=0.0: must be a finite number > 0" in result.stderr

    study = optuna.load_study(study_name="failing", storage=f"sqlite:///{study_db}")
    states = [t.state for t in study.trials]
    assert len(states) == 3 and {optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE} == set(states)
    runs = trials(sweep_dir(out))
    assert len(runs) == 3
    for trial, (run, overrides) in zip(study.trials, runs):
        assert overrides["optimizer.lr"] == str(trial.params["optimizer.lr"])
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == json.loads((run / "metrics.json").read_text())["best/val/acc"]
        else:
            assert overrides["optimizer.lr"] == "0" and not (run / "metrics.json").exists()
    results = yaml.safe_load((sweep_dir(out) / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optimizer.lr": 0.01} and results["best_value"] == study.best_value
