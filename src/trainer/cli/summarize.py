"""A sorted table of the runs under a directory: a sweep, a day, or all of outputs/.

    htt-summarize outputs/multirun/2026-11-23/10-00-00-123456
    htt-summarize outputs --sort best/val --format markdown
    htt-summarize outputs --columns test/auroc,test/ece --sort test/ece   # any metric of metrics.json
    htt-summarize outputs --format csv > runs.csv
    python scripts/summarize.py ...          # the same in a checkout

A run is a directory where train.py trained: `.hydra/` says the job was `train` (eval.py's and lr_find.py's
directories are left out), and a process that resumed a run elsewhere (`trainer.resume=...`, no checkpoint or
event file of its own; its train.log says where it continued) is that run, not one of its own. Its status is
`finished` (it wrote metrics.json), `stopped` (it has a checkpoint to resume from, but no metrics.json; its
epochs and best validation value so far come from that last.pt) or `failed` (neither: it stopped before its
first checkpoint, e.g. on a bad value; its train.log ends with why). Finished runs come first, best first by
`--sort`.

Run directories get copied in from other machines: each file is read only if it is a regular file of at most a
few MiB, YAML without aliases or deep nesting (trainer.run.untrusted); anything else ends the command with one
`error:` line naming the file.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

from trainer.errors import UserError, is_number, printable
from trainer.run.untrusted import load_json, load_yaml

COLUMNS = ("run", "status", "test/acc", "test/loss", "test/f1", "best/val", "epochs", "seconds", "overrides")
# The other tasks' main metrics (docs/tasks.md): a column of their own wherever a run under the root has them
TASK_COLUMNS = ("test/mae", "test/r2", "test/map", "test/knn_acc")


def runs(root: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    """One row per run directory under `root`; `extra`: more metrics of metrics.json as columns."""
    rows = []
    for saved in sorted(root.rglob(".hydra/overrides.yaml")):
        run = saved.parent.parent
        overrides = load_yaml(saved) or []
        if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise UserError(f"{saved}: not a list of overrides (key=value strings)")
        if not is_training_run(run, overrides):
            continue
        parts = run.relative_to(root).parts
        # A sweep job's directory is "<n>_<overrides>" (the overrides may even hold "/"): keep "<n>", the
        # overrides get their own column.
        job = next((i for i, p in enumerate(parts) if p.partition("_")[0].isdigit() and "_" in p), None)
        name = "/".join(parts if job is None else (*parts[:job], parts[job].partition("_")[0])) or "."
        # printable: a copied run's names and overrides must not forge lines or drive the terminal
        row = {"run": printable(name), "overrides": printable(" ".join(overrides))}
        fold = fold_of(run)
        if fold is not None:  # grouped with the other folds of its configuration (group_folds)
            rest = " ".join(o for o in overrides if o.partition("=")[0].lstrip("+") != "dataset.fold")
            row["_fold"] = (fold, ("/".join(parts[:job]) if job is not None else "", rest))
        metrics_file = run / "metrics.json"
        if os.path.lexists(metrics_file):  # a link to /dev/zero or a FIFO is refused, not passed over
            metrics = read_metrics(metrics_file, extra)
            best = next((v for k, v in metrics.items() if k.startswith("best/") and k != "best/epoch"), None)
            row.update({"status": "finished", "test/acc": metrics.get("test/acc"),
                        "test/loss": metrics.get("test/loss"), "test/f1": metrics.get("test/f1"), "best/val": best,
                        "epochs": metrics.get("epochs"), "seconds": round(metrics.get("seconds_since_start") or 0, 1),
                        **{column: metrics.get(column) for column in extra}})
        else:
            last = next(run.glob("*/last.pt"), None)
            row["status"] = "stopped" if last is not None else "failed"
            if last is not None:  # how far it got, and its best so far: what resuming it continues from
                row.update(progress_of(last))
        rows.append(row)
    return rows


def fold_of(run: Path) -> tuple[int, int] | None:
    """(fold, folds) of a k-fold run (dataset.folds in its .hydra/config.yaml), else None."""
    saved = run / ".hydra" / "config.yaml"
    dataset = lookup(load_yaml(saved), "dataset") if os.path.lexists(saved) else None
    folds, fold = lookup(dataset, "folds"), lookup(dataset, "fold")
    if folds is None:
        return None
    if not (isinstance(folds, int) and isinstance(fold, int) and 0 <= fold < folds):
        raise UserError(f"{saved}: dataset.fold={str(fold)[:20]} of dataset.folds={str(folds)[:20]} is not a fold")
    return fold, folds


def group_folds(rows: list[dict], columns: tuple[str, ...]) -> list[dict]:
    """The folds of one configuration (one sweep's, or single runs' of the same overrides but dataset.fold) as one
    row: each number column as (mean, standard deviation, runs) over its finished folds."""
    groups: dict[tuple, list[dict]] = {}
    out = []
    for row in rows:
        if "_fold" not in row:
            out.append(row)
            continue
        (fold, folds), (where, rest) = row["_fold"]
        groups.setdefault((where, rest, folds), []).append(row)
    for (where, rest, folds), members in groups.items():
        finished = [r for r in members if r["status"] == "finished"]
        seen = sorted(r["_fold"][0][0] for r in members)
        complete = len(finished) == folds and seen == list(range(folds))
        status = f"{folds} folds" if complete else f"{len(finished)} of {folds} folds"
        row = {"run": f"{where or '.'} (folds {','.join(map(str, seen))})", "status": status, "overrides": rest}
        for column in columns:
            values = [r[column] for r in finished if is_number(r.get(column))]
            if column not in ("run", "status", "overrides") and values:
                spread = statistics.stdev(values) if len(values) > 1 else None
                row[column] = Spread(statistics.fmean(values), spread, len(values))
        out.append(row)
    return out


class Spread(float):
    """A column's mean over the folds (sorts and compares as it), with their standard deviation (n - 1)."""

    def __new__(cls, mean: float, std: float | None, n: int) -> Spread:
        value = super().__new__(cls, mean)
        value.std, value.n = std, n
        return value


def read_metrics(path: Path, extra: tuple[str, ...] = ()) -> dict:
    """metrics.json as a mapping whose values in the table's columns are numbers or null (as the report writes
    them), else UserError."""
    metrics = load_json(path)
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: not a JSON object of metrics")
    shown = ("test/acc", "test/loss", "test/f1", "epochs", "seconds_since_start", *extra)
    bad = next((k for k, v in metrics.items() if (k in shown or k.startswith("best/")) and not (
        v is None or is_number(v))), None)
    if bad is not None:
        raise UserError(f"{path}: {bad} is {str(metrics[bad])[:40]!r}, not a number")
    return metrics


def progress_of(checkpoint: Path) -> dict:
    """`epochs` and `best/val` of a stopped run, from its last.pt, read as every consumer reads a checkpoint
    (load_checkpoint: no code in the file runs, and a zip bomb is refused before it is inflated)."""
    from trainer.errors import UserError
    from trainer.run.checkpoint import (
        load_checkpoint,  # only for stopped runs: importing torch takes a second or two
    )

    try:
        state = load_checkpoint(checkpoint)
    except UserError:  # a torn, foreign or hostile file: the row keeps its blanks
        return {}
    return {"epochs": state["epoch"], "best/val": state.get("best_metric")}


def is_training_run(run: Path, overrides: list[str]) -> bool:
    """Whether train.py trained in `run` (see the module docstring)."""
    saved = run / ".hydra" / "hydra.yaml"
    job = lookup(load_yaml(saved), "hydra", "job", "name") if os.path.lexists(saved) else None
    if (job or "train") != "train":
        return False
    resumed_elsewhere = any(o.startswith("trainer.resume=") for o in overrides) and not (
        any(run.glob("*/last.pt")) or any(run.glob("events.out.tfevents.*")))
    return not resumed_elsewhere


def lookup(node: object, *keys: str) -> object:
    """node[k1][k2]... of a file's YAML, or None where a key is missing or a level is not a mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def sort_key(column: str):
    # errors (a regression's mae and rmse too), calibration error and time: lower first
    lower_is_better = column.split("/")[1 if "/" in column else 0] in ("mae", "rmse") or \
        column.endswith(("loss", "ece")) or column == "seconds"

    def key(row: dict):
        value = row.get(column)
        if value is None:
            return (1, 0.0)
        return (0, value if lower_is_better else -value)
    return key


def cell(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, Spread):
        if column == "epochs":  # counts: 5 ± 0, not 5.0000 ± 0.0000
            return f"{float(value):g}" + ("" if value.std is None else f" ± {value.std:.2g}")
        plain = cell(float(value), column)
        return plain if value.std is None else f"{plain} ± {cell(value.std, column)}"
    if column == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):  # a diverged run's loss of 96.3919906616211 as 96.39
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="outputs", help="directory to search (default: outputs)")
    parser.add_argument("--columns", default="", help="more metrics of metrics.json as columns, comma-separated: "
                        "test/auroc,test/ece,test/balanced_acc (docs/metrics.md)")
    parser.add_argument("--sort", default="test/acc", help="the column to sort by (lower first for *loss, *ece, mae, "
                        "rmse and seconds): test/acc, test/loss, test/f1, best/val, epochs, seconds or one of "
                        "--columns")
    parser.add_argument("--format", default="table", choices=("table", "markdown", "csv"))
    args = parser.parse_args()
    extra = tuple(c for c in args.columns.split(",") if c and c not in COLUMNS)
    automatic = tuple(c for c in TASK_COLUMNS if c not in extra)
    columns = (*COLUMNS[:-3], *extra, *automatic, *COLUMNS[-3:])  # before epochs, seconds and overrides
    if args.sort not in columns or args.sort in ("run", "status", "overrides"):
        print(f"error: --sort {args.sort}: not a column; use one of "
              f"{', '.join(c for c in columns if c not in ('run', 'status', 'overrides'))} (--columns adds more)",
              file=sys.stderr)
        return 1
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 1
    try:
        rows = sorted(group_folds(runs(root, extra + automatic), columns), key=sort_key(args.sort))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"error: no training runs under {root} (a run directory holds .hydra/overrides.yaml)", file=sys.stderr)
        return 1
    unknown = [c for c in extra if all(row.get(c) is None for row in rows)]
    if unknown:  # a typo would otherwise be a column of dashes
        print(f"error: --columns {unknown[0]}: no run under {root} has it in its metrics.json (docs/metrics.md "
              "lists the keys)", file=sys.stderr)
        return 1
    absent = {c for c in automatic if all(row.get(c) is None for row in rows)}  # no run of that task here
    columns = tuple(c for c in columns if c not in absent)
    table = [[cell(row.get(c), c) for c in columns] for row in rows]
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(table)
    elif args.format == "markdown":
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for line in table:
            print("| " + " | ".join(v.replace("|", "\\|") for v in line) + " |")
    else:
        widths = [max(len(c), *(len(line[i]) for line in table)) for i, c in enumerate(columns)]
        for line in [list(columns), *table]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0


def run() -> None:
    """The command (`htt-summarize`, `python scripts/summarize.py`)."""
    try:
        sys.exit(main())
    except BrokenPipeError:  # `summarize.py outputs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit would flush into the pipe again
        sys.exit(0)
