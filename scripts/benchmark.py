#!/usr/bin/env python
"""Training throughput, side by side in one process: bare floor vs this framework vs the tutorial loop.

For each device x model x batch size, the same number of training steps is timed for:
  floor      a bare loop over pre-normalised tensors already on the device, in the Trainer's memory format
             (channels-last, model and input, unless trainer.channels_last=false): forward, loss, backward, step;
  +data      the same bare loop fed by the framework's input pipeline (shuffled gather, normalisation);
  framework  the real Trainer.train_epoch (shuffling, batched normalisation, metrics, TensorBoard logging,
             progress bar) plus its checkpoint save;
  tutorial   the PyTorch quickstart loop: torchvision's MNIST with ToTensor() through a DataLoader.
The framework run is `train.setup()`, so it is built exactly as train.py builds it; all use the same model
initialisation (the config's seed) and the config's optimizer. The floor, +data and tutorial columns build a
fresh model for each repetition; the framework column trains one Trainer through all of them, one epoch each,
so what a run pays once (torch.compile's compilation, trainer.cuda_graphs' warm-up and capture) falls in its
untimed warm-up. Repetitions are interleaved (floor, +data, framework, tutorial, floor, ...), after one untimed
warm-up each, and the median is reported. `noise` is the spread (slowest / fastest - 1) of the floor's own
repetitions: a ratio closer to 1.00 than that is within this machine's timing noise.

    python scripts/benchmark.py                              # CPU (and CUDA when available), all rows
    python scripts/benchmark.py --models mlp --batch-sizes 64 --reps 5
    python scripts/benchmark.py --data rgb32 --models mlp cnn --batch-sizes 128 512   # 50,000 3x32x32 images
    python scripts/benchmark.py --decode 50000               # image_folder: first decode, then cached start-up
    python scripts/benchmark.py --mnist-fast 3               # experiment=mnist_fast, whole process, 3 seeds
    python scripts/benchmark.py --mnist-fast 5 --experiment mnist_fast_gpu   # the GPU recipe (a GPU machine)
    python scripts/benchmark.py --devices cuda --set trainer.cuda_graphs=true   # CUDA rows, the step as a CUDA graph
    python scripts/benchmark.py --sweep 3 --reps 2           # a 6-job MLP sweep: basic vs joblib launcher
    python scripts/benchmark.py --metric-losses --reps 30    # mined triplet losses vs pytorch-metric-learning's
    python scripts/benchmark.py --beyond-memory 2 --budget 0.5   # 2 GiB of images over a 0.5 GiB memory budget

`--data rgb32` times 50,000 generated 3x32x32 images (a `dataset=tensors` file) in place of MNIST; it has no
tutorial column (the quickstart loop reads MNIST). `--decode N` writes N generated 32x32 PNGs in class folders
and times the image_folder dataset's first build (decoding every file) and a second one (from its cache), next
to MNIST's cached build, which is what every MNIST run starts with. `--mnist-fast N` runs
`python train.py experiment=mnist_fast seed=S` for N seeds, one process after another, and reports what each took
from outside (wall time from before the process starts to its exit, and its peak RSS as the kernel counts it),
next to the test accuracy, the start-up time (process start to first training step) and the training time (the
epochs with their validation and checkpoints) it wrote in metrics.json; `--experiment` times another preset.
`--metric-losses` times one loss and backward of this project's mined triplet losses (task=embedding) and of
pytorch-metric-learning's miner + TripletMarginLoss, side by side on the same batch (256 x 64 on the CPU), when
that library is importable (it is not a dependency: `pip install pytorch-metric-learning` to compare).
`--beyond-memory GIB` writes a tensors file of GIB GiB of generated 3x32x32 images and times reading training
batches (gather and normalisation, and the same with an MLP's training step) three ways: held in memory (the
default budget), and over `--budget` GiB (dataset.memory_budget_gib: window by window from the memory-mapped
cache) with the cache file in the page cache (warm) and evicted from it first (cold: what a dataset larger than
memory meets each epoch).
`--set KEY=VALUE ...` adds config overrides to every row (the framework column trains with them; the floor and
+data columns are bare loops and take only what shapes them, such as trainer.channels_last).
"""

from __future__ import annotations

from trainer.cli.allocator import preload_mimalloc

if __name__ == "__main__":
    preload_mimalloc()  # the allocator train.py runs with, for every loop timed here

import argparse  # noqa: E402
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from trainer.cli import train  # noqa: E402
from trainer.cli.config import build  # noqa: E402
from trainer.cli.paths import prepare_hydra  # noqa: E402
from trainer.loop.seeding import seed_everything  # noqa: E402
from trainer.system import allocator_in_use  # noqa: E402


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row:
    """One device x model x batch-size comparison; each method builds a fresh model from the same seed."""

    def __init__(self, device: torch.device, model: str, batch_size: int, steps: int, data: list[str], run_dir: Path,
                 extra: list[str]):
        self.device, self.steps, self.batch_size = device, steps, batch_size
        self.cfg = config(f"model={model}", f"dataset.batch_size={batch_size}", *data, *extra,
                          f"trainer.limit_train_batches={steps}", "trainer.max_epochs=1000000",
                          f"trainer.device={device}")
        self.data = build(self.cfg.dataset, device=device, seed=self.cfg.seed)
        self.run_dir = run_dir
        # The floor gets the best layout too: channels-last (NHWC) for model and input when the Trainer uses it.
        self.memory_format = torch.channels_last if self.cfg.trainer.channels_last else torch.contiguous_format
        # floor: every training image normalised once, in the order the loop will slice it
        images, self.floor_y = self.data.train.raw()
        self.floor_x = self.data.train.transform(images).contiguous(memory_format=self.memory_format)  # (N, C, H, W)
        self.epoch = 0
        self.trainer = None  # the framework column's, made by its untimed first repetition
        if steps > len(self.data.train):
            raise SystemExit(f"--samples: {steps} steps of {batch_size} are more than one epoch of the training split "
                             f"({self.data.train.num_items} samples); use fewer")

    def fresh(self):
        seed_everything(self.cfg.seed)  # the initialisation train.setup() gives the framework's model
        model = build(self.cfg.model, in_shape=self.data.in_shape,
                      num_classes=self.data.num_classes).to(self.device, memory_format=self.memory_format)
        loss_fn = train.build_loss(self.cfg.loss, self.data)
        return model, loss_fn, train.build(self.cfg.optimizer, params=model.parameters())

    def _bare_loop(self, batches) -> float:
        """Time forward, loss, backward and step over `batches` with a fresh model; nothing else."""
        model, loss_fn, optimizer = self.fresh()
        model.train()
        sync(self.device)
        start = time.perf_counter()
        for x, y in batches:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(self.device)
        return time.perf_counter() - start

    def floor(self) -> float:
        bs = self.batch_size
        return self._bare_loop((self.floor_x[i * bs:(i + 1) * bs], self.floor_y[i * bs:(i + 1) * bs])
                               for i in range(self.steps))

    def floor_data(self) -> float:
        """The floor, fed by the framework's input pipeline (shuffled gather + normalisation on the device):
        what any loop that shuffles its data pays on top of the floor."""
        self.data.train.set_epoch(self.epoch)
        return self._bare_loop((x.contiguous(memory_format=self.memory_format), y)
                               for _, (x, y) in zip(range(self.steps), self.data.train))

    def framework(self) -> float:
        if self.trainer is None:  # exactly what train.py builds (data from its cache), once for every repetition
            self.trainer = train.setup(self.cfg, self.run_dir)
        self.epoch += 1
        self.trainer.progress.batch_in_epoch = 0  # a new epoch (fit() would reset it)
        sync(self.device)
        start = time.perf_counter()
        self.trainer.train_epoch(self.epoch)
        self.trainer.save_checkpoint("last.pt")
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.logger.close()

    def tutorial(self) -> float:
        if self.cfg.dataset._target_ != "trainer.data.MNIST":
            return float("nan")
        from torch.utils.data import DataLoader
        from torchvision import datasets
        from torchvision.transforms import ToTensor

        model, loss_fn, optimizer = self.fresh()
        dataset = datasets.MNIST(self.cfg.dataset.root, train=True, transform=ToTensor())
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=True)
        model.train()
        sync(self.device)
        start = time.perf_counter()
        for batch, (X, y) in enumerate(loader):  # the quickstart's train loop, verbatim but for the step limit
            if batch == self.steps:
                break
            X, y = X.to(self.device), y.to(self.device)
            pred = model(X)
            loss = loss_fn(pred, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if batch % 100 == 0:
                loss = loss.item()
        sync(self.device)
        return time.perf_counter() - start


def main() -> int:  # noqa: C901, PLR0915 (one branch per table the options ask for)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["logistic", "mlp", "cnn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--samples", type=int,
                        help="training samples per timed run (default: one epoch, 55,000 for MNIST and 45,000 for "
                             "rgb32; cnn on cpu: an eighth of this)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--root", default=str(REPO / "data"))
    parser.add_argument("--data", choices=("mnist", "rgb32"), default="mnist",
                        help="mnist (from --root), or rgb32: 50,000 generated 3x32x32 images")
    parser.add_argument("--decode", type=int, metavar="N", help="time decoding N PNGs instead (see above)")
    parser.add_argument("--mnist-fast", type=int, metavar="N", help="time experiment=mnist_fast for N seeds instead")
    parser.add_argument("--experiment", default="mnist_fast",
                        help="the preset --mnist-fast times (default: mnist_fast)")
    parser.add_argument("--no-tutorial", action="store_true", help="leave out the tutorial column (its DataLoader "
                        "is most of a GPU run's time)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every row")
    parser.add_argument("--metric-losses", action="store_true",
                        help="time the mined triplet losses against pytorch-metric-learning's instead")
    parser.add_argument("--sweep", type=int, metavar="EPOCHS",
                        help="time a 6-job MLP sweep of EPOCHS epochs: basic launcher vs hydra/launcher=joblib instead")
    parser.add_argument("--beyond-memory", type=float, metavar="GIB",
                        help="time training batches from GIB GiB of images held in memory and over --budget instead")
    parser.add_argument("--budget", type=float, default=0.5, help="--beyond-memory's dataset.memory_budget_gib")
    args = parser.parse_args()
    if args.beyond_memory:
        return beyond_memory_times(args.beyond_memory, args.budget, args.reps)
    if args.decode:
        return decode_times(args.decode, args.root)
    if args.mnist_fast:
        return mnist_fast_times(args.mnist_fast, args.root, args.experiment, args.set)
    if args.sweep or args.metric_losses:
        return sweep_times(args.sweep, args.root, args.reps) if args.sweep else metric_loss_times(args.reps)
    args.samples = args.samples or (45_000 if args.data == "rgb32" else 55_000)  # the training split: one epoch

    if any(torch.device(d).type == "cuda" for d in args.devices) and not torch.cuda.is_available():
        print("error: --devices cuda needs a CUDA GPU, and torch sees none here; use --devices cpu", file=sys.stderr)
        return 1
    methods = ("floor", "floor_data", "framework") + (() if args.no_tutorial else ("tutorial",))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, malloc: {allocator_in_use()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
          + (f"; overrides: {' '.join(args.set)}" if args.set else ""))
    header = (f"{'device':6} {'model':8} {'batch':>5} {'steps':>5} | {'floor':>8} {'+data':>8} {'framework':>9} "
              f"{'tutorial':>8} samples/s | {'fw/floor':>8} {'fw/+data':>8} {'tut/fw':>6} | {'fw-floor':>8} "
              f"{'fw-data':>7} us/step | {'noise':>5} | {'cuda MiB':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        data = [f"dataset.root={args.root}"]
        if args.data == "rgb32":
            x, y = generated(50_000, 32, 32)
            np.savez(Path(tmp) / "rgb32.npz", train_x=x, train_y=y, test_x=x[:10_000], test_y=y[:10_000])
            data = ["dataset=tensors", f"dataset.path={Path(tmp) / 'rgb32.npz'}", "dataset.val_size=5000"]
        for device in map(torch.device, args.devices):
            for model in args.models:
                for bs in args.batch_sizes:
                    samples = args.samples // 8 if (model == "cnn" and device.type == "cpu") else args.samples
                    steps = max(samples // bs, 5)
                    row = Row(device, model, bs, steps, data, Path(tmp) / f"{device.type}-{model}-{bs}", args.set)
                    times: dict[str, list[float]] = {m: [] for m in methods}
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    for rep in range(args.reps + 1):  # rep 0 warms up (allocator, kernels, file cache)
                        for m in methods:
                            seconds = getattr(row, m)()
                            if rep:
                                times[m].append(seconds)
                    med = {m: statistics.median(times[m]) for m in methods}
                    med.setdefault("tutorial", float("nan"))
                    rate = {m: steps * bs / med[m] for m in med}
                    noise = max(times["floor"]) / min(times["floor"]) - 1
                    row.close()
                    cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
                    print(f"{device.type:6} {model:8} {bs:5} {steps:5} | {rate['floor']:8.0f} {rate['floor_data']:8.0f}"
                          f" {rate['framework']:9.0f} {rate['tutorial']:8.0f}           |"
                          f" {med['framework'] / med['floor']:8.2f} {med['framework'] / med['floor_data']:8.2f}"
                          f" {med['tutorial'] / med['framework']:6.2f} |"
                          f" {(med['framework'] - med['floor']) / steps * 1e6:8.1f}"
                          f" {(med['framework'] - med['floor_data']) / steps * 1e6:7.1f}         |"
                          f" {noise:5.0%} | {cuda_mib:8.0f}", flush=True)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("fw/floor: framework time / floor time (1.00 = no overhead); fw/+data: framework / floor fed by the same\n"
          "input pipeline (the Trainer's own cost: metrics, logging, checkpoint); tut/fw: tutorial / framework;\n"
          "fw-floor, fw-data: what the framework adds per training step, in microseconds, over the floor and over\n"
          "the floor fed by the same input pipeline; noise: spread of the floor's repetitions.\n"
          "floor and +data use the Trainer's memory format (channels-last unless trainer.channels_last=false).")
    return 0


def generated(n: int, h: int, w: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w, 3) uint8 images and (n,) labels: noise plus a bright band whose height and colour tell the class."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = rng.integers(0, 70, (n, h, w, 3), dtype=np.uint8)
    for k in range(classes):
        band = slice((k % 5) * h // 5, (k % 5 + 1) * h // 5)
        images[labels == k, band, :, k % 3] += 170
    return images, labels


def decode_times(n: int, root: str) -> int:
    """Seconds to build the image_folder dataset over `n` PNGs: first (decoding), then from the cache; and MNIST's."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pngs"
        x, y = generated(n, 32, 32)
        start = time.perf_counter()
        for k in range(10):
            (folder / f"class {k}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(x[i]).save(folder / f"class {y[i]}" / f"{i}.png")
        print(f"wrote {n} PNGs (32x32 RGB) in {time.perf_counter() - start:.1f} s")
        folder_data = ["dataset=image_folder", f"dataset.path={folder}"]
        for what, overrides in (("image_folder, first run (decodes)", folder_data),
                                ("image_folder, later run (cached)", folder_data),
                                ("mnist, cached (every MNIST run)", [f"dataset.root={root}"])):
            cfg = config(*overrides)
            start = time.perf_counter()
            data = build(cfg.dataset, device="cpu", seed=0)
            images = data.train.num_items + data.val.num_items + data.test.num_items
            print(f"{what:36} {time.perf_counter() - start:7.2f} s  ({images} images {data.in_shape})")
    return 0


def evict(path: Path) -> None:
    """Drop `path`'s pages from the page cache, those this process has mapped too (madvise, then fadvise)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for line in open("/proc/self/maps"):
        span, *rest = line.split(maxsplit=5)
        if len(rest) == 5 and rest[-1].strip() == str(path):
            low, high = (int(a, 16) for a in span.split("-"))
            libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), 4)  # MADV_DONTNEED
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def beyond_memory_times(gib: float, budget: float, reps: int, batch: int = 256, steps: int = 400) -> int:
    """Training batches per second from `gib` GiB of 3x32x32 images: in memory vs over a `budget` GiB memory budget
    (warm and cold page cache); the data path alone, and with an MLP's training step."""
    n = int(gib * 2**30) // 3072
    with tempfile.TemporaryDirectory(dir=REPO / "outputs") as tmp:
        path = Path(tmp) / "big.npz"
        start = time.perf_counter()
        x, y = generated(n, 32, 32)
        np.savez(path, train_x=x, train_y=y)
        del x, y
        seconds = time.perf_counter() - start
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB ({n} images 3x32x32) in {seconds:.0f} s")
        rows = {}
        for what, budget_gib in (("in memory", None), (f"over a {budget:g} GiB budget", budget)):
            cfg = config("dataset=tensors", f"dataset.path={path}", f"dataset.batch_size={batch}",
                         f"dataset.memory_budget_gib={'null' if budget_gib is None else budget_gib}")
            start = time.perf_counter()
            data = build(cfg.dataset, device="cpu", seed=0)
            print(f"{what}: built in {time.perf_counter() - start:.1f} s ({'streaming' if data.streaming else 'held'})")
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 256), torch.nn.ReLU(),
                                        torch.nn.Linear(256, 10))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            caches = ("warm", "cold") if data.streaming else ("warm",)
            for cache in caches:
                for train_step in (False, True):
                    times = []
                    for rep in range(reps + 1):
                        data.train.set_epoch(rep)
                        if cache == "cold":
                            evict(data.cache_file)
                        start = time.perf_counter()
                        for i, (images, labels) in enumerate(data.train):
                            if train_step:
                                loss = torch.nn.functional.cross_entropy(model(images), labels)
                                optimizer.zero_grad()
                                loss.backward()
                                optimizer.step()
                            if i + 1 == steps:
                                break
                        if rep:  # rep 0 warms up
                            times.append(time.perf_counter() - start)
                    rate = steps * batch / statistics.median(times)
                    rows[(what, cache, train_step)] = rate
                    print(f"  {what:24} page cache {cache}  {'+MLP step' if train_step else 'data only':10}"
                          f"  {rate:10.0f} samples/s", flush=True)
        base = {step: rows[("in memory", "warm", step)] for step in (False, True)}
        print("\n| data | page cache | data only, samples/s | ratio | with an MLP step, samples/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (what, cache, step), rate in rows.items():
            if step:
                continue
            with_step = rows[(what, cache, True)]
            print(f"| {what} | {cache} | {rate:.0f} | {rate / base[False]:.2f} | {with_step:.0f} | "
                  f"{with_step / base[True]:.2f} |")
    return 0


def mnist_fast_times(seeds: int, root: str, experiment: str = "mnist_fast", extra: list[str] = ()) -> int:
    """Whole-process wall time, peak RSS, start-up, training time and test accuracy of `train.py
    experiment=EXPERIMENT`, per seed."""
    import json
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as out:
        print(" ".join([f"experiment={experiment}", *extra]))
        print(f"{'seed':>4} {'wall s':>7} {'startup s':>9} {'fit s':>7} {'test/acc':>8} {'peak RSS MiB':>12}")
        for seed in range(seeds):
            errors = Path(out) / f"stderr{seed}"
            with open(errors, "wb") as err:  # a file, not a pipe: nothing reads a pipe while the run goes on
                start = time.perf_counter()
                proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"experiment={experiment}",
                                         f"seed={seed}", f"dataset.root={root}", f"output_root={out}/{seed}", *extra],
                                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS, from outside
                wall = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                print(errors.read_text(errors="replace"), file=sys.stderr)
                return 1
            metrics = json.loads(next(Path(out, str(seed)).rglob("metrics.json")).read_text())
            rows.append((wall, metrics["startup_s"], metrics["fit_s"], metrics["test/acc"], usage.ru_maxrss / 1024))
            print(f"{seed:4} {wall:7.1f} {metrics['startup_s']:9.1f} {metrics['fit_s']:7.2f} {metrics['test/acc']:8.4f}"
                  f" {rows[-1][4]:12.0f}", flush=True)
    means = [statistics.mean(column) for column in zip(*rows)]
    print(f"mean {means[0]:7.1f} {means[1]:9.1f} {means[2]:7.2f} {means[3]:8.4f} {means[4]:12.0f}")
    return 0


SWEEP = ("model=mlp", "optimizer.lr=0.0003,0.001,0.003", "model.dropout=0.0,0.2")  # 6 jobs


def metric_loss_times(reps: int, batch: int = 256, dim: int = 64, classes: int = 10) -> int:
    """Median time of one loss + backward: trainer.loop.losses.MinedTripletLoss against pytorch-metric-learning's
    BatchHardMiner / TripletMarginMiner("semihard") with its TripletMarginLoss, interleaved, on one batch."""
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        print("error: pytorch-metric-learning is not installed (it is not a dependency); pip install "
              "pytorch-metric-learning to compare with it", file=sys.stderr)
        return 1
    from trainer.loop.losses import MinedTripletLoss

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, dim, generator=generator, requires_grad=True)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    theirs = losses.TripletMarginLoss(margin=0.2)
    miner = {"batch_hard": miners.BatchHardMiner(),
             "semi_hard": miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); a batch of {batch} embeddings of "
          f"{dim}, {classes} classes; loss + backward, median of {reps}")
    for mining in ("batch_hard", "semi_hard"):
        ours = MinedTripletLoss(margin=0.2, mining=mining)
        calls = {"this project": lambda: ours(embeddings, targets),
                 "pytorch-metric-learning": lambda m=mining: theirs(embeddings, targets, miner[m](embeddings, targets))}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for rep in range(reps + 1):  # rep 0 warms up
            for name, call in calls.items():
                embeddings.grad = None
                start = time.perf_counter()
                call().backward()
                if rep:
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ours_ms, theirs_ms = med["this project"], med["pytorch-metric-learning"]
        print(f"{mining:10}  this project {ours_ms:7.2f} ms  pytorch-metric-learning {theirs_ms:7.2f} ms  "
              f"ratio {theirs_ms / ours_ms:.2f}")
    return 0


def sweep_times(epochs: int, root: str, reps: int) -> int:
    """Wall time of `train.py -m` over SWEEP with Hydra's basic launcher (one job after another, in one process)
    and with hydra/launcher=joblib (one worker process per core, each job's torch limited to cores / workers
    threads by joblib), interleaved, as whole processes; and whether each job's test metrics are the same."""
    import json
    import subprocess

    def sweep(launcher: list[str], out: Path) -> tuple[float, dict]:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "train.py"), "-m", *launcher, *SWEEP, f"trainer.max_epochs={epochs}",
                        f"dataset.root={root}", f"output_root={out}"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        jobs = {m.parent.name.split("_", 1)[1]: json.loads(m.read_text()) for m in out.rglob("metrics.json")}
        return wall, {job: (m["test/acc"], m["test/loss"]) for job, m in jobs.items()}

    times: dict[str, list[float]] = {"basic": [], "joblib": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for name, launcher in (("basic", []), ("joblib", ["hydra/launcher=joblib"])):
                wall, results[name] = sweep(launcher, Path(tmp) / f"{name}{rep}")
                times[name].append(wall)
                print(f"rep {rep} {name:6} {wall:6.1f} s  ({len(results[name])} jobs)", flush=True)
    basic, joblib = (statistics.median(times[k]) for k in ("basic", "joblib"))
    same = results["basic"] == results["joblib"]
    print(f"6-job MLP sweep, {epochs} epoch(s) a job, {os.cpu_count()} cores: basic {basic:.1f} s, "
          f"joblib {joblib:.1f} s (medians of {reps}); basic/joblib {basic / joblib:.2f}x; test metrics of every job "
          f"{'identical' if same else 'DIFFERENT'}")
    if not same:
        for job in sorted(results["basic"]):
            print(f"  {job}: basic {results['basic'][job]}, joblib {results['joblib'].get(job)}")
    return 0


if __name__ == "__main__":
    prepare_hydra()  # ${root_dir:} and the schemas, which the configs use
    sys.exit(main())
