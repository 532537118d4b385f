#!/usr/bin/env python
"""Checks scripts/lr_find.py against reality (docs/configs.md "LR range test" holds its table):

    python scripts/lr_find_check.py

For MNIST MLP with SGD, MLP with Adam and the CNN with Adam: the LR range test's suggestion, then one epoch of
train.py (constant LR: scheduler=none) at the suggestion and at 5 LRs over 3 decades. Prints a Markdown table of
the test accuracies and whether the suggestion is within 0.5 points of the grid's best. Each run is a real
`python train.py` / `python scripts/lr_find.py` process with its own output directory under outputs/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name: (overrides, grid of 5 LRs over 3 decades)
    "MLP, SGD": (["model=mlp", "optimizer=sgd"], [1e-3, 5.6e-3, 3.2e-2, 1.8e-1, 1.0]),
    "MLP, Adam": (["model=mlp", "optimizer=adam"], [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1]),
    "CNN, Adam": (["model=cnn", "optimizer=adam"], [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1]),
}
ONE_EPOCH = ["trainer.max_epochs=1", "scheduler=none", "trainer.log_graph=false"]


def run(script: str, *overrides: str) -> str | None:
    """The process's output, or None when training diverged (train.py's one-line NaN error)."""
    done = subprocess.run([sys.executable, str(REPO / script), *overrides], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        if "training loss is nan" in done.stderr or "weights became non-finite" in done.stderr:
            return None
        sys.exit(f"{script} {' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def test_acc(overrides: list[str], lr: float) -> float:
    """Test accuracy after one epoch at `lr`; 0 for a run that diverged."""
    out = run("train.py", *overrides, *ONE_EPOCH, f"optimizer.lr={lr:.3g}")
    if out is None:
        return 0.0
    run_dir = re.search(r"run dir (\S+)", out)[1]
    return json.loads((Path(run_dir) / "metrics.json").read_text())["test/acc"]


def main() -> None:
    print("| model, optimizer | suggested LR | its test acc | grid LR: test acc | grid best | within 0.5 pt |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (overrides, grid) in CASES.items():
        suggested = float(re.search(r"suggested learning rate: (\S+)", run("scripts/lr_find.py", *overrides))[1])
        ours = test_acc(overrides, suggested)
        accs = {lr: test_acc(overrides, lr) for lr in grid}
        best = max(accs.values())
        cells = ", ".join(f"{lr:.2g}: {acc:.2%}" if acc else f"{lr:.2g}: diverged" for lr, acc in accs.items())
        print(f"| {name} | {suggested:.2e} | {ours:.2%} | {cells} | {best:.2%} | "
              f"{'yes' if ours >= best - 0.005 else 'NO'} ({100 * (ours - best):+.2f}) |", flush=True)


if __name__ == "__main__":
    main()
