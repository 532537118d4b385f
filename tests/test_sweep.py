"""`python train.py -m ...`: every job in its own directory, a failing job does not stop the others, and
`scripts/summarize.py` tabulates the sweep."""

import csv
import io
import shutil
import subprocess
import sys

from conftest import REPO, TINY, run_train


def summarize(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_sweep_runs_every_job_reports_the_failed_one_and_summarizes(tiny_root, tmp_path):
    out = tmp_path / "outputs"
    result = run_train("-m", *TINY, f"dataset.root={tiny_root}", f"output_root={out}", "trainer.max_epochs=1",
                       "scheduler=none", "model=mlp,logistic", "optimizer.lr=0,0.01")
    assert result.returncode != 0  # the sweep says a job failed...
    assert "error: optimizer.lr=0.0: must be a finite number > 0" in result.stderr
    assert "Error executing job with overrides: [" in result.stderr
    jobs = sorted(p.parent.parent for p in out.rglob(".hydra/overrides.yaml"))
    assert len(jobs) == 4 and len({j.name for j in jobs}) == 4  # ...after running all four, each in its own dir
    finished = sorted(j.name for j in jobs if (j / "metrics.json").is_file())
    assert [f.split("_")[0] for f in finished] == ["1", "3"]
    assert "model=logistic,optimizer.lr=0.01" in finished[1] and "root" not in finished[1]  # named by what, not where

    table = summarize(str(out))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "test/acc"]
    assert [line.split()[1] for line in lines[1:]] == ["finished", "finished", "failed", "failed"]
    rows = list(csv.DictReader(io.StringIO(summarize(str(out), "--format", "csv").stdout)))
    accs = [float(r["test/acc"]) for r in rows if r["status"] == "finished"]
    assert accs == sorted(accs, reverse=True) and all(0 < a <= 1 for a in accs)
    failed = [set(r["overrides"].split()) for r in rows if r["status"] == "failed"]
    assert all("optimizer.lr=0" in f for f in failed) and {"model=mlp", "model=logistic"} <= set.union(*failed)
    markdown = summarize(str(out), "--format", "markdown", "--sort", "test/loss").stdout.splitlines()
    assert markdown[0].startswith("| run | status |") and markdown[1].startswith("| --- |") and len(markdown) == 6
    # any metric of metrics.json as a column, and sorted by (ECE: lower first)
    rows = list(csv.DictReader(io.StringIO(summarize(str(out), "--format", "csv", "--columns",
                                                     "test/ece,test/balanced_acc", "--sort", "test/ece").stdout)))
    eces = [float(r["test/ece"]) for r in rows if r["status"] == "finished"]
    assert eces == sorted(eces) and all(0 < float(r["test/balanced_acc"]) <= 1 for r in rows[:2]), rows
    assert list(rows[0])[:8] == ["run", "status", "test/acc", "test/loss", "test/f1", "best/val", "test/ece",
                                 "test/balanced_acc"]
    refused = summarize(str(out), "--sort", "test/ece")
    assert refused.returncode == 1 and refused.stderr.startswith("error: --sort test/ece: not a column")
    typo = summarize(str(out), "--columns", "test/eec")
    assert typo.returncode == 1 and typo.stderr.startswith("error: --columns test/eec: no run under"), typo.stderr

    # A run stopped before its test (Ctrl-C, a kill) has checkpoints but no metrics.json: "stopped", not "failed"
    stopped = out / "2026-01-01" / "00-00-00-000000"
    shutil.copytree(jobs[1], stopped)
    (stopped / "metrics.json").unlink()
    rows = list(csv.DictReader(io.StringIO(summarize(str(out), "--format", "csv").stdout)))
    (row,) = [r for r in rows if r["run"] == "2026-01-01/00-00-00-000000"]
    assert (row["status"], row["epochs"]) == ("stopped", "1") and 0 < float(row["best/val"]) <= 1, row
    assert sorted(r["status"] for r in rows) == ["failed", "failed", "finished", "finished", "stopped"]

    # Not runs of their own: eval.py's and lr_find.py's directories (their .hydra names the job), and the process
    # that resumed a run in that run's directory (trainer.resume=..., only .hydra and train.log of its own)
    for script in ("eval", "lr_find"):
        other = out / script / "2026-01-01" / "00-00-00-000000"
        shutil.copytree(jobs[1], other)
        hydra = other / ".hydra" / "hydra.yaml"
        hydra.write_text(hydra.read_text().replace("    name: train\n", f"    name: {script}\n"))
    resumer = out / "2026-01-01" / "00-00-01-000000"
    shutil.copytree(jobs[1] / ".hydra", resumer / ".hydra")
    (resumer / ".hydra" / "overrides.yaml").write_text(f"- trainer.resume={jobs[1]}/checkpoints/last.pt\n")
    (resumer / "train.log").write_text(f"continuing in {jobs[1]}\n")
    again = list(csv.DictReader(io.StringIO(summarize(str(out), "--format", "csv").stdout)))
    assert [r["run"] for r in again] == [r["run"] for r in rows], again


def test_summarize_explains_an_empty_directory(tmp_path):
    result = summarize(str(tmp_path))
    assert result.returncode == 1 and "no training runs under" in result.stderr


def test_the_joblib_launcher_runs_jobs_in_parallel_workers_that_share_the_cores(tiny_root, tmp_path):
    """hydra/launcher=joblib: each job in its own directory, a failing job reported like the basic launcher's,
    each worker's torch on cores / workers threads, and the same numbers as a serial sweep on that many threads."""
    import json
    import os

    sweep = (*TINY, f"dataset.root={tiny_root}", "trainer.max_epochs=1", "scheduler=none", "model=mlp",
             "optimizer.lr=0,0.01,0.003")
    parallel = run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *sweep,
                         f"output_root={tmp_path / 'parallel'}")
    assert parallel.returncode != 0 and "error: optimizer.lr=0.0: must be a finite number > 0" in parallel.stderr
    threads = max(os.cpu_count() // 2, 1)
    named = f"{threads} CPU thread{'s' * (threads != 1)}"  # 1 CPU thread on this 2-core machine
    assert parallel.stdout.count(f"MLP on cpu ({named})") == 2, parallel.stdout[-3000:]
    serial = run_train("-m", *sweep, f"trainer.num_threads={threads}", f"output_root={tmp_path / 'serial'}")

    def results(root):
        return {m.parent.name.split("_", 1)[1].replace(f",trainer.num_threads={threads}", ""):
                json.loads(m.read_text())["test/loss"] for m in root.rglob("metrics.json")}

    got, want = results(tmp_path / "parallel"), results(tmp_path / "serial")
    assert len(got) == 2 and got == want, (got, want, serial.stderr[-2000:])


def test_summarize_into_a_pipe_that_closes_early_is_no_error(tiny_root, tmp_path):
    out = tmp_path / "outputs"
    assert run_train(*TINY, f"dataset.root={tiny_root}", f"output_root={out}", "trainer.max_epochs=1", "scheduler=none",
                     "model=logistic").returncode == 0
    run, many = next(out.rglob("metrics.json")).parent, out / "many"
    for i in range(1000):  # more rows than a pipe buffer holds (64 KiB)
        shutil.copytree(run, many / f"{i:03d}", ignore=shutil.ignore_patterns("*.pt", "events.*"))
    result = subprocess.run(f"{sys.executable} {REPO / 'scripts' / 'summarize.py'} {out} --format csv | head -1",
                            shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("run,status") and "Traceback" not in result.stderr, result.stderr
