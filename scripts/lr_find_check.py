#!/usr/bin/env python
"""Checks the LR range test's suggestion rule (scripts/lr_find.py; docs/configs.md "LR range test") against reality:

    python scripts/lr_find_check.py                  # 4 datasets x 3 (model, optimizer) pairs, six rules
    python scripts/lr_find_check.py --report-only    # the tables from the results so far, training nothing
    python scripts/lr_find_check.py --constant       # the first check: 3 MNIST cases at a constant LR

For MNIST, FashionMNIST, an image folder (FashionMNIST's test split as class folders, PNG and JPEG files of three
sizes) and colour MNIST (each digit in one random colour over another), each with the MLP and SGD, the CNN and
Adam, and the CNN and SGD: the range test, then one epoch of 100 batches of train.py (seed 42, the default onecycle
schedule) at 7 LRs over 3 decades and at what six rules make of the test's curve (its lr_find.json): the LR at the
smoothed loss's minimum over 5, 10, 3 and 2 (scripts/lr_find.py divides by 2 for one-cycle, by 5 at a constant LR,
as these checks found), the steepest descent, and fastai's valley. A rule's LR within a factor 1.25 of an LR
already trained for that case takes that run's test accuracy; any other gets a run of its own. Prints two Markdown
tables: each case's test accuracy at each rule's LR and on the grid, then each rule's shortfall from the best run
of each case (worst, mean, how many within 0.5 and 1 point).

It took 29 min on a 2-core CPU (12 range tests and 124 one-epoch runs). Each run is a real `python train.py` /
`python scripts/lr_find.py` process writing under outputs/lr_find_check/; the image folder and colour MNIST are
built once, under data/lr_check/, from the MNIST and FashionMNIST files in data/ (provisioned if missing). Every
result goes into outputs/lr_find_check/results.json as it comes, so a check that stopped resumes where it was:
delete the file to start over, or give --results another.

--constant: for MNIST with the MLP and SGD, the MLP and Adam, and the CNN and Adam, the suggestion, then one full
epoch at a constant LR (scheduler=none) at the suggestion and at 5 LRs over 3 decades; one table of the test
accuracies and whether the suggestion is within 0.5 points of the grid's best (21 processes, about 5 min).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from trainer.run.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "lr_find_check"
RESULTS = OUT / "results.json"
DATA = REPO / "data" / "lr_check"
FOLDER, COLOUR_MNIST = DATA / "folder", DATA / "colour_mnist.npz"
FASHION_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle_boot"]
DATASETS = {
    "MNIST": ["dataset=mnist"],
    "FashionMNIST": ["dataset=fashion_mnist"],
    "folder (FMNIST test)": ["dataset=image_folder", f"dataset.path={FOLDER}"],
    "colour MNIST": ["dataset=tensors", f"dataset.path={COLOUR_MNIST}"],
}
PAIRS = {
    "MLP+SGD": ["model=mlp", "optimizer=sgd"],
    "CNN+Adam": ["model=cnn", "optimizer=adam"],
    "CNN+SGD": ["model=cnn", "optimizer=sgd"],
}
GRID = {"sgd": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0], "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
# One torch thread: on a 2-core machine shared with other jobs, 2 threads per process thrashed (an MLP epoch took
# 34 s with 2 threads, 5 s with 1, the same test accuracy).
THREADS = "trainer.num_threads=1"
# Only the test accuracy is read: no graph, histograms or misclassified images to write.
TRAIN = ["trainer.max_epochs=1", "trainer.limit_train_batches=100", "trainer.log_graph=false",
         "trainer.histogram_every_n_epochs=null", "trainer.misclassified_images=0", THREADS]
NUM_STEPS = 300  # lr_find.num_steps, left at its default: fastai's valley cuts the curve by the steps asked for
# train.py's one-line error (the last line of its stderr) when the loss or the weights stop being finite.
DIVERGED = re.compile(r"training loss is (nan|-?inf)|weights became non-finite")
# A data file is named in the cache's keys without its folder (where, not what: as a run's name leaves out
# dataset.root), so the cache holds wherever the checkout is, and --results reads one written elsewhere.
DATA_FOLDER_IN_KEY = re.compile(r"(?<=dataset\.path=)\S*/")

# --constant: {name: (overrides, grid of 5 LRs over 3 decades)}, one full epoch each.
CONSTANT_CASES = {
    "MLP, SGD": (["model=mlp", "optimizer=sgd"], [1e-3, 5.6e-3, 3.2e-2, 1.8e-1, 1.0]),
    "MLP, Adam": (["model=mlp", "optimizer=adam"], [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1]),
    "CNN, Adam": (["model=cnn", "optimizer=adam"], [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1]),
}
CONSTANT_EPOCH = ["trainer.max_epochs=1", "scheduler=none", "trainer.log_graph=false"]


# --- the rules: an LR from a range test's curve (lr_find.json: lr, smoothed_loss) --------------------------------
def lowest(curve: dict) -> float:
    """The LR at the smoothed loss's minimum."""
    smoothed = curve["smoothed_loss"]
    return curve["lr"][min(range(len(smoothed)), key=smoothed.__getitem__)]


def fraction_of_lowest(curve: dict, divisor: int) -> float:
    return lowest(curve) / divisor


def steepest(curve: dict) -> float:
    """The largest negative slope of the smoothed loss against log LR, the first and last 10% of the steps left out
    (where the smoothing has not settled, and where the loss blows up)."""
    log_lr, smoothed = np.log(np.array(curve["lr"])), np.array(curve["smoothed_loss"])
    slope = np.gradient(smoothed, log_lr)
    cut = len(smoothed) // 10
    return float(curve["lr"][cut + int(np.argmin(slope[cut:len(smoothed) - cut]))])


def valley(curve: dict) -> float:
    """fastai's `valley`, on the smoothed losses fastai's lr_find gives it (recorder[num_it//10:-5]): the longest
    strictly descending subsequence, and the point 1/3 + 1/6 (about halfway) into it."""
    lrs = curve["lr"][NUM_STEPS // 10:-5]
    losses = curve["smoothed_loss"][NUM_STEPS // 10:-5]
    max_start, max_end = 0, 0
    descending = [1] * len(losses)  # the longest descending subsequence ending at each point
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and descending[i] < descending[j] + 1:
                descending[i] = descending[j] + 1
            if descending[max_end] < descending[i]:
                max_end = i
                max_start = max_end - descending[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


RULES = {f"min/{k}": partial(fraction_of_lowest, divisor=k) for k in (5, 10, 3, 2)} | {
    "steepest": steepest, "valley": valley}


# --- the generated datasets -------------------------------------------------------------------------------------
def build_folder(path: Path) -> None:
    """FashionMNIST's test split as class folders, alternately PNG and JPEG (quality 90), at 28, 32 and 36 pixels in
    turn: the decoding and resizing an image folder of real files needs."""
    from PIL import Image  # here only: the tables need neither PIL nor torch (read_mnist's)

    from trainer.cli.make_data import read_mnist

    fashion = read_mnist(REPO / "data", "FashionMNIST")
    partial_dir = path.with_name(path.name + ".partial")  # renamed into place whole: a half-built folder is no data
    shutil.rmtree(partial_dir, ignore_errors=True)
    for name in FASHION_CLASSES:
        (partial_dir / name).mkdir(parents=True)
    for i, (pixels, label) in enumerate(zip(fashion["test_x"], fashion["test_y"])):
        image, size = Image.fromarray(pixels), (28, 32, 36)[i % 3]
        if size != 28:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        if i % 2 == 0:
            image.save(partial_dir / FASHION_CLASSES[label] / f"{i}.png")
        else:
            image.save(partial_dir / FASHION_CLASSES[label] / f"{i}.jpg", quality=90)
    partial_dir.rename(path)


def paint(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """(N, 28, 28, 3) uint8: each grey digit as the blend of a random foreground colour over a random background."""
    foreground = rng.integers(0, 256, (len(digits), 1, 1, 3)).astype(np.float32)
    background = rng.integers(0, 256, (len(digits), 1, 1, 3)).astype(np.float32)
    alpha = digits[..., None].astype(np.float32) / 255
    return np.clip(np.rint(alpha * foreground + (1 - alpha) * background), 0, 255).astype(np.uint8)


def build_colour_mnist(path: Path) -> None:
    """MNIST with every digit painted (numpy seed 0): three channels, and colour that says nothing of the class."""
    from trainer.cli.make_data import read_mnist  # here only: it imports torch, which the tables do without

    mnist = read_mnist(REPO / "data", "MNIST")
    rng = np.random.default_rng(0)
    train_x = paint(rng, mnist["train_x"])
    test_x = paint(rng, mnist["test_x"])
    with atomic_write(path) as f:
        np.savez(f, train_x=train_x, train_y=mnist["train_y"].astype(np.int64),
                 test_x=test_x, test_y=mnist["test_y"].astype(np.int64))


def build_data() -> None:
    """Each generated dataset that is missing; one that exists stays as it is: the cached results were trained on it."""
    DATA.mkdir(parents=True, exist_ok=True)
    for path, build in ((FOLDER, build_folder), (COLOUR_MNIST, build_colour_mnist)):
        if not path.exists():
            print(f"building {path.relative_to(REPO)}", flush=True)
            build(path)


# --- runs -------------------------------------------------------------------------------------------------------
class Diverged(Exception):
    """train.py stopped on a loss or weights that were no longer finite; the message is its error line."""


def run(script: str, args: list[str]) -> str:
    """The output (stdout, then stderr) of `python script args` with its run directory under OUT; Diverged when
    training diverged, exit on any other failure."""
    done = subprocess.run([sys.executable, str(REPO / script), *args, f"output_root={OUT}"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        if DIVERGED.search(last):
            raise Diverged(last)
        sys.exit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def run_dir(output: str) -> str:
    return re.search(r"run dir (.+)", output)[1].strip()  # the last thing on train.py's start-up line


def test_acc(directory: str) -> float:
    return json.loads((Path(directory) / "metrics.json").read_text())["test/acc"]


def lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def cache_key(text: str) -> str:
    return DATA_FOLDER_IN_KEY.sub("", text)


def load(path: Path) -> dict:
    return {cache_key(key): value for key, value in json.loads(path.read_text()).items()} if path.exists() else {}


def save(results: dict, path: Path) -> None:
    with atomic_write(path) as f:  # an interrupted check keeps every result before the one it was writing
        f.write(json.dumps(results, indent=1).encode())


def train(results: dict, path: Path, base: list[str], lr: float) -> float:
    """Test accuracy (0.0: diverged) after one epoch of 100 batches at `lr`; from the cache, else run and cached."""
    args = [*base, "seed=42", *TRAIN, f"optimizer.lr={lr_text(lr)}"]
    key = cache_key("train " + " ".join(args))
    if key not in results:
        start = time.time()
        try:
            directory = run_dir(run("train.py", args))
            result = {"acc": test_acc(directory), "diverged": False, "run_dir": directory}
        except Diverged as e:
            result = {"acc": 0.0, "diverged": True, "error": str(e)}
        results[key] = {**result, "secs": round(time.time() - start, 1)}
        save(results, path)
        outcome = "diverged" if result["diverged"] else f"{result['acc']:.4f}"
        print(f"  {' '.join(base)} lr={lr_text(lr)}: {outcome} ({results[key]['secs']:.0f}s)", flush=True)
    return results[key]["acc"]


def range_test_key(base: list[str]) -> str:
    return cache_key("lr_find " + " ".join([*base, "seed=42", THREADS]))


def range_test(results: dict, path: Path, base: list[str]) -> None:
    """Run the range test unless the cache has it; the cache records where it wrote its lr_find.json."""
    key = range_test_key(base)
    if key not in results:
        start = time.time()
        out_dir = re.search(r"wrote (.+?)/lr_find\.png, ", run("scripts/lr_find.py", [*base, "seed=42", THREADS]))[1]
        results[key] = {"json": f"{out_dir}/lr_find.json", "secs": round(time.time() - start, 1)}
        save(results, path)
        print(f"  lr_find {' '.join(base)} ({results[key]['secs']:.0f}s)", flush=True)


def curve(results: dict, base: list[str]) -> dict:
    """The curve a cached range test wrote, from the path the cache records."""
    path = Path(results[range_test_key(base)]["json"])
    if not path.is_file():
        sys.exit(f"{path}: missing; delete the entry for `{range_test_key(base)}` from the results to test again")
    return json.loads(path.read_text())


def trained(results: dict, base: list[str]) -> dict[float, float]:
    """{lr: test acc} of every run trained for this case."""
    prefix = cache_key("train " + " ".join([*base, "seed=42", *TRAIN]) + " optimizer.lr=")
    return {float(k[len(prefix):]): v["acc"] for k, v in results.items() if k.startswith(prefix)}


def nearest(lr: float, lrs: list[float]) -> float | None:
    """The trained LR closest to `lr` on a log scale, if within a factor 1.25 (close enough to stand for it)."""
    closest = min(lrs, key=lambda x: abs(math.log(x / lr)))
    return closest if max(closest / lr, lr / closest) <= 1.25 else None


def cases() -> list[tuple[str, str, list[str], str]]:
    """(dataset, pair, overrides, optimizer) for each case, in the tables' order."""
    return [(d, p, [*dv, *pv], pv[1].split("=")[1]) for p, pv in PAIRS.items() for d, dv in DATASETS.items()]


def check(path: Path) -> None:
    """Each case's range test, its grid, then the rules' LRs in turn (a rule's run can stand for a later rule's)."""
    build_data()
    results, start = load(path), time.time()
    for dataset, pair, base, optimizer in cases():
        print(f"{dataset}, {pair}", flush=True)
        range_test(results, path, base)
        for lr in GRID[optimizer]:
            train(results, path, base, lr)
        for rule in RULES.values():
            lr = rule(curve(results, base))
            if nearest(lr, list(trained(results, base))) is None:
                train(results, path, base, lr)
    print(f"this invocation: {time.time() - start:.0f}s", flush=True)


# --- the tables -------------------------------------------------------------------------------------------------
def fmt(acc: float) -> str:
    return "diverged" if acc == 0 else f"{100 * acc:.2f}"


def case_table(results: dict) -> dict[str, list[float]]:
    """Print each case's row; return each rule's shortfalls (points below its case's best run)."""
    shortfalls = {rule: [] for rule in RULES}
    print("\n| dataset | model+opt | " + " | ".join(f"{r} LR: acc" for r in RULES) + " | grid LR: acc | best (LR) |")
    print("|" + " --- |" * (4 + len(RULES)))
    for dataset, pair, base, optimizer in cases():
        runs = trained(results, base)
        if range_test_key(base) not in results or not runs:
            continue
        lr_curve, best_lr = curve(results, base), max(runs, key=runs.get)
        cells = []
        for rule, suggest in RULES.items():
            lr = suggest(lr_curve)
            stand_in = nearest(lr, list(runs))
            if stand_in is None:
                cells.append(f"{lr:.2e}: (not run)")
                continue
            shortfalls[rule].append(100 * (runs[stand_in] - runs[best_lr]))
            cells.append(f"{lr:.2e}: {fmt(runs[stand_in])}"
                         + ("" if abs(math.log(stand_in / lr)) < 1e-2 else f" (~{lr_text(stand_in)})"))
        grid = ", ".join(f"{lr_text(lr)}: {fmt(runs.get(float(lr_text(lr)), math.nan))}" for lr in GRID[optimizer])
        best = f"{fmt(runs[best_lr])} ({lr_text(best_lr)})"
        print(f"| {dataset} | {pair} | " + " | ".join(cells) + f" | {grid} | {best} |")
    return shortfalls


def report(results: dict) -> None:
    shortfalls = case_table(results)
    print("\n| rule | combos | worst shortfall | mean shortfall | within 0.5 pt | within 1.0 pt |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rule, s in shortfalls.items():
        if s:
            print(f"| {rule} | {len(s)} | {min(s):+.2f} | {sum(s) / len(s):+.2f} | {sum(x >= -0.5 for x in s)} | "
                  f"{sum(x >= -1.0 for x in s)} |")
    secs = sum(v.get("secs", 0) for v in results.values())
    print(f"\n{sum(k.startswith('train') for k in results)} training runs, "
          f"{sum(k.startswith('lr_find') for k in results)} range tests, {secs / 60:.1f} min of process time")


# --- --constant -------------------------------------------------------------------------------------------------
def constant_acc(overrides: list[str], lr: float) -> float:
    """Test accuracy after one full epoch at a constant `lr`; 0 for a run that diverged."""
    try:
        return test_acc(run_dir(run("train.py", [*overrides, *CONSTANT_EPOCH, f"optimizer.lr={lr:.3g}"])))
    except Diverged:
        return 0.0


def constant_check() -> None:
    print("| model, optimizer | suggested LR | its test acc | grid LR: test acc | grid best | within 0.5 pt |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (overrides, grid) in CONSTANT_CASES.items():
        # scheduler=none: the suggestion for the schedule these runs train with (a constant LR: a fifth)
        found = run("scripts/lr_find.py", [*overrides, "scheduler=none"])
        suggested = float(re.search(r"suggested learning rate: (\S+)", found)[1])
        ours = constant_acc(overrides, suggested)
        accs = {lr: constant_acc(overrides, lr) for lr in grid}
        best = max(accs.values())
        cells = ", ".join(f"{lr:.2g}: {acc:.2%}" if acc else f"{lr:.2g}: diverged" for lr, acc in accs.items())
        print(f"| {name} | {suggested:.2e} | {ours:.2%} | {cells} | {best:.2%} | "
              f"{'yes' if ours >= best - 0.005 else 'NO'} ({100 * (ours - best):+.2f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="print the tables from the results, training nothing")
    mode.add_argument("--constant", action="store_true", help="the first check instead: 3 MNIST cases, constant LR")
    parser.add_argument("--results", type=Path, help="the results file (default: outputs/lr_find_check/results.json)")
    args = parser.parse_args()
    if args.constant:
        if args.results:
            parser.error("--constant caches nothing: --results is for the default check and --report-only")
        constant_check()
        return
    path = args.results or RESULTS
    if args.report_only and not path.is_file():
        parser.error(f"no results file {path}: run the check first")
    if not args.report_only:
        check(path)
    report(load(path))


if __name__ == "__main__":
    main()
