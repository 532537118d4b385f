"""Every command in the README's shell blocks, run exactly as a user types it, from a fresh copy of the repo.

The other tests run train.py with overrides no user types (`hydra.run.dir=...`, `dataset.root=...`, tiny
generated data). This module reads the commands out of the markdown itself (README.md and docs/*.md), so a
command added to the README is tested without anyone remembering to, and runs each one:

- in a fresh copy of the files git knows (`git ls-files -co --exclude-standard`), its `.venv` a symlink to
  this checkout's (what `make setup` made), with `bash -c`, cwd = the copy, and PATH starting with the venv's
  bin directory (the activated venv the README describes). PYTHONPATH names the copy's `src/`: in a clone,
  the editable install points at the clone, here it points at this checkout;
- with the default `outputs/` and `data/` of the copy; `data/` gets real MNIST and FashionMNIST (from
  `../shared/data` as a mirror when present, else from the offline registry sources via `real_root`);
- with placeholders (`outputs/.../checkpoints/best.pt`, `/data`, ...) replaced by what an earlier README command
  made (SUBSTITUTIONS); an unknown placeholder fails the command's test;
- with only `trainer.max_epochs=1`, `trainer.limit_train_batches`, `trainer.limit_eval_batches` appended to
  training commands (appends_for), to keep each run to seconds;
- except the commands in SKIP, each with its reason. EXPECT_FAIL holds the ones documented to fail.

Each command must exit 0 (or fail as EXPECT_FAIL says), print no traceback, and leave what it promises
(check_result). Commands run in README order; a command whose input another one makes runs that one first.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pytest
import yaml
from image_data import arrays, labelled_folder, mixed_folder

# pytest-xdist: the commands run in order in one copy of the repository, in one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme_commands")]

REPO = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO.parent / "shared" / "data"  # as in conftest.py: developers' and CI's copy; optional
MARKDOWN_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TIMEOUT_S = 900  # one command; make train (a full CNN epoch) is the longest

# ------------------------------------------------------------------------------------------------ parsing

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Command:
    text: str   # as written: continuation lines joined, the trailing `# comment` stripped
    where: str  # "README.md:35"


def strip_comment(line: str) -> str:
    """`line` without an unquoted `# ...` comment (a `#` at the start or after whitespace, as bash reads it)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_in_block(lines: list[tuple[int, str]], name: str) -> list[Command]:
    """The commands of one shell block: one a line (`\\` continues it), comments and shown output left out.

    In a block where some line starts with a `$ ` prompt, only those lines are commands, the rest output."""
    prompted = any(text.lstrip().startswith("$ ") for _, text in lines)
    commands, pending, start = [], None, 0
    for number, raw in lines:
        line = raw.strip()
        if pending is None:
            if prompted:
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:].strip()
            if not line or line.startswith("#"):
                continue  # blank, a comment, or output shown as one
            pending, start = "", number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        text = strip_comment(pending + line)
        if text:
            commands.append(Command(text, f"{name}:{start}"))
        pending = None
    return commands


def commands_in_markdown(text: str, name: str) -> list[Command]:
    """The commands of every fenced bash/sh/shell/console block of a markdown text, in order."""
    commands, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opened = FENCE_OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, language = opened.group(1), opened.group(2).lower()
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        if language in SHELL_LANGUAGES:
            commands += commands_in_block([(j + 1, lines[j]) for j in range(i + 1, end)], name)
        i = end + 1
    return commands


def readme_commands(paths: Iterable[Path] = MARKDOWN_FILES, root: Path = REPO) -> list[Command]:
    """Every shell command shown in these markdown files, file by file, in order."""
    return [c for p in paths for c in commands_in_markdown(Path(p).read_text(), str(Path(p).relative_to(root)))]


COMMANDS = readme_commands()

# ------------------------------------------------------------------------------ what is not run, and why

SKIP = {
    "python scripts/make_task_data.py rotation":
        "tests/test_generated_data.py runs the generators, this one included; the rotation preset below is skipped",
    "python train.py experiment=mnist_rotation":
        "the regression path of experiment=counts_poisson above (a tensors file of numbers, MSE on standardised "
        "targets: tests/test_tasks.py trains it end to end); its measured result is docs/tasks.md's",
    "python train.py experiment=counts_poisson loss=mse":
        "experiment=counts_poisson above with loss=mse, the regression path tests/test_tasks.py trains end to end",
    "bash scripts/gpu_check.sh":
        "needs a CUDA GPU (it runs tests/test_cuda.py, the CUDA benchmark rows and mnist_fast_gpu); "
        "docs/development.md says when it was run and docs/performance.md holds its figures",
    "python train.py experiment=mnist_fast_gpu":
        "needs a CUDA GPU (it replays CUDA graphs); test_train_cli's preset test runs it on CPU without them",
    ".venv/bin/python scripts/benchmark.py --devices cuda --models logistic mlp cnn --batch-sizes 512 --reps 3 "
    "--no-tutorial":
        "needs a CUDA GPU",
    ".venv/bin/python scripts/benchmark.py --devices cuda --models logistic mlp cnn --batch-sizes 512 --reps 3 "
    "--no-tutorial --set trainer.cuda_graphs=true scheduler.cycle_momentum=false":
        "needs a CUDA GPU",
    "make test":
        "this test suite itself (it would run this module again, for an hour on 2 cores); CI runs it",
    ".venv/bin/python -m pytest -m \"not slow\"":
        "the non-slow part of this test suite itself; CI runs it",
    "pip install -e '.[slurm]'":
        "`pip install -e .` in the copy would re-point the shared venv's editable install at the temporary "
        "copy; the extra is already in the venv ('.[dev]' includes it): test_skipped_installs_are_installed",
    "pip install -e '.[optuna]'":
        "`pip install -e .` in the copy would re-point the shared venv's editable install at the temporary "
        "copy; the extra is already in the venv ('.[dev]' includes it): test_skipped_installs_are_installed",
    "pip install -e '.[parallel]'":
        "`pip install -e .` in the copy would re-point the shared venv's editable install at the temporary "
        "copy; the extra is already in the venv ('.[dev]' includes it): test_skipped_installs_are_installed",
    "torchrun --standalone --nproc_per_node=4 train.py":
        "needs 4 CUDA devices (nccl); without them it would run 4 gloo CPU processes, which is not what it "
        "documents, and the 2-process CPU line covers that path",
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d "
    "--rdzv_endpoint=HOST0:29500 --rdzv_id=job1 train.py":
        "needs 2 machines with 8 GPUs each and a rendezvous host HOST0",
    "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu model=mlp,cnn optimizer.lr=0.001,0.003":
        "needs a SLURM cluster (sbatch); tests/test_distributed.py runs the same plugin with submitit's local "
        "executor",
    "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.nodes=2 "
    "hydra.launcher.tasks_per_node=8 hydra.launcher.gpus_per_node=8 model=cnn dataset.batch_size=16":
        "needs a SLURM cluster with 2 nodes of 8 GPUs",
    "python train.py dataset=cifar10 model=torchvision model.name=resnet18":
        "downloads CIFAR-10 (170 MB) from the internet; tests/test_open_data.py trains the same options on CIFAR "
        "files in torchvision's layout",
    "htt-train dataset=custom dataset._target_=mydata.Stripes model=custom model._target_=mydata.TinyNet":
        "runs from a user's directory beside the mydata.py of docs/data.md: tests/test_open_data.py writes that "
        "file from docs/data.md and runs this command there",
    **{command: "README and docs/your_project.md: the package installed from a wheel and the guide's project "
                "folder, which tests/test_install.py builds, makes and runs these commands in, as written"
       for command in ("pip install path/to/hydra-torch-trainer",
                       "pip wheel --no-deps -w dist path/to/hydra-torch-trainer",
                       "htt-train --config-dir configs experiment=stripes",
                       "htt-train --config-dir configs experiment=stripes trainer.resume=auto",
                       "htt-train --config-dir configs experiment=stripes trainer.max_epochs=6 "
                       "trainer.resume=outputs/<date>/<time>/checkpoints/last.pt",
                       "htt-eval --config-dir configs ckpt=outputs/<date>/<time>/checkpoints/best.pt",
                       "python mydata.py",
                       "htt-predict --config-dir configs outputs/<date>/<time>/checkpoints/best.pt samples/top.png "
                       "samples/bottom.png",
                       "htt-summarize",
                       "pip install .",
                       "pip install '.[export]'",
                       )},
    **{command: "runs from a user's project folder: tests/test_callbacks_and_trackers.py writes the callback and "
                "the tracker of docs/callbacks.md and docs/tracking.md, with their config files, into a folder and "
                "trains with them there (killed, resumed, and compared with a run that never stopped)"
       for command in ("htt-train --config-dir configs callbacks=[step_counter,keep_checkpoints]",
                       "htt-train --config-dir configs callbacks=[step_counter] callbacks.step_counter.out=counts.json",
                       "htt-train --config-dir configs logger=[tensorboard,jsonl]")},
    **{command: "serves until stopped, and under '.[dev]' (SQLAlchemy 1.4, which the optuna extra pins) mlflow's "
                "server needs tests/sqlalchemy2_names, as docs/tracking.md says: tests/test_mlflow.py starts "
                "`mlflow server` so on a loopback port and reads a training run back through its REST API"
       for command in ("mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db",
                       "mlflow server --backend-store-uri sqlite:///outputs/mlflow.db --port 5001")},
    "mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 --port 5000":
        "a tracking server on a machine of its own (`server`): tests/test_mlflow.py trains against a real "
        "`mlflow server` on a loopback port",
    "python train.py logger=mlflow logger.mlflow.tracking_uri=http://server:5000":
        "needs the tracking server of the line above on a host named `server`: tests/test_mlflow.py runs this "
        "command against `mlflow server` on a loopback port",
    "python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=3 logger=mlflow seed=1,2,3":
        "three parallel jobs of a full default CNN epoch each; tests/test_mlflow.py runs this sweep on tiny data and "
        "checks one parent run, three FINISHED children and the SQLite store's integrity",
    "pip install -e '.[mlflow]'":
        "`pip install -e .` in the copy would re-point the shared venv's editable install at the temporary "
        "copy; the extra is already in the venv ('.[dev]' includes it): test_skipped_installs_are_installed",
    ".venv/bin/python scripts/benchmark.py":
        "every row (3 models x 2 batch sizes), each timed 4 ways over full epochs, 6 times: far longer than the "
        "one-row line below",
    "python scripts/benchmark.py --beyond-memory 2 --budget 0.5":
        "writes a 2 GiB file and reads 400 batches 5 ways, 6 times each (minutes): its table is docs/real_data.md's; "
        "tests/test_beyond_memory.py trains over a memory budget through train.py",
    "python scripts/lr_find_check.py":
        "136 processes (12 LR range tests, 124 one-epoch runs of 100 batches, 29 min): its tables are in "
        "docs/configs.md; tests/test_lr_find.py runs scripts/lr_find.py itself",
    ".venv/bin/python scripts/benchmark.py --models mlp --batch-sizes 64 --reps 5":
        "14.4 min on the shared 2-core machine (4 loops x 6 full MLP epochs, the tutorial loop's DataLoader most "
        "of it): too long for this module; a README line with small --samples and --reps would run here",
}

# Commands the README shows failing on purpose: {command: text its stderr must contain}.
EXPECT_FAIL: dict[str, str] = {}

# Commands that serve until stopped: run as written in the background until their log line (a regex whose
# group 1 is the URL) appears, checked through HTTP, then stopped with Ctrl-C as their banner says.
SERVERS = {
    "tensorboard --logdir outputs": r"TensorBoard \S+ at (http://\S+?)/? ",
}

# ------------------------------------------------------------------------------------------- placeholders


@dataclass(frozen=True)
class Made:
    """A path an earlier README command made: `path` (a glob) inside the run directory it created, or inside
    its sweep directory for a `-m` command. The command runs first if it has not yet."""
    command: str
    path: str = ""


@dataclass(frozen=True)
class Fixture:
    """A path this module provides: `provision_root` (empty, outside the copy), `mirror` (a data mirror),
    `image_folder` (a generated folder of class folders of PNGs) or `arrays` (a generated .npz)."""
    name: str


QUICKSTART_BEST = Made("make train", "checkpoints/best.pt")  # one full CNN epoch: it reads digits right
SUBSTITUTIONS: dict[str, Made | Fixture] = {
    # A finished default (CNN, Adam, one-cycle) run: trainer.resume=... trainer.max_epochs=10 trains it on.
    "outputs/2026-11-23/13-00-00-123456/checkpoints/last.pt": Made("python train.py", "checkpoints/last.pt"),
    # `model=mlp trainer.resume=...`: a finished single MLP run with the default optimizer and scheduler, which
    # the next line of docs/checkpoints.md makes (it finds no unfinished run, so it starts one). Not a sweep
    # job's: their directory names hold `=` and `,`, which Hydra's override grammar rejects in trainer.resume=PATH.
    "outputs/2026-11-23/10-00-00-123456/checkpoints/last.pt":
        Made("python train.py model=mlp trainer.resume=auto", "checkpoints/last.pt"),
    "outputs/2026-11-23/10-00-00-123456/checkpoints/best.pt": QUICKSTART_BEST,
    ".../best.pt": QUICKSTART_BEST,
    "outputs/.../checkpoints/best.pt": QUICKSTART_BEST,
    # "that sweep": the one on the line above it
    "outputs/multirun/2026-11-23/10-00-00-123456":
        Made("python train.py -m model=logistic,mlp,cnn optimizer=sgd,adam trainer.max_epochs=3"),
    # "Training on": a finished default (CNN) run of 1 epoch, which `trainer.resume=auto` starts when it finds no
    # unfinished run (`python train.py`'s own run, the other one with the same overrides, has finished by then).
    "outputs/2026-11-23/11-00-00-123456/checkpoints/last.pt":
        Made("python train.py trainer.resume=auto", "checkpoints/last.pt"),
    # docs/real_data.md: the k-fold sweep on the line above it
    "outputs/multirun/2026-11-23/12-00-00-123456":
        Made("python train.py -m model=mlp dataset.folds=5 'dataset.fold=range(5)'"),
    "/path/to/photos": Fixture("image_folder"),
    "/path/to/arrays.npz": Fixture("arrays"),
    "/path/to/pets": Fixture("pets"),  # docs/data.md's labels files: multi-label and regression targets
    "/path/to/pets/labels.csv": Fixture("pets_labels"),
    "/path/to/dials": Fixture("dials"),
    "/path/to/dials.csv": Fixture("dials_labels"),
    "/data": Fixture("provision_root"),
    "/mnt/datasets": Fixture("mirror"),
}
# The README's placeholders name runs of different models in different commands: the table above says what a
# placeholder stands for in general, this one where one command needs another run. {command: {placeholder: ...}}
SUBSTITUTIONS_IN: dict[str, dict[str, Made | Fixture]] = {}  # {command: its own substitutions}, where one differs
# Not placeholders: `digit.png` and `photo_of_a_seven.jpg` are made in the copy's root (two sevens of the MNIST
# test set, drawn as a user would have them), and `--out deploy/` writes into the copy, as it would for a user.

# `...`, `<date>`, a dated run directory, or an absolute path (outside the copy) not in SUBSTITUTIONS
PLACEHOLDER = re.compile(r"\.\.\.|<[^<>\s]+>|\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}|(?<![^\s=])/(?!/)\S*")


def _token(text: str) -> re.Pattern:
    """`text` as a whole word of a command: after a space, `=` or the start, before a space or the end."""
    return re.compile(rf"(?<![^\s=]){re.escape(text)}(?!\S)")


def unknown_placeholders(command: str) -> list[str]:
    rest = command
    for key in sorted({**SUBSTITUTIONS, **SUBSTITUTIONS_IN.get(command, {})}, key=len, reverse=True):
        rest = _token(key).sub(" ", rest)
    return PLACEHOLDER.findall(rest)


# -------------------------------------------------------------------------------------- what is appended

APPENDS_EPOCHS = "trainer.max_epochs=1"
APPENDS_LIMITS = ("trainer.limit_train_batches=8", "trainer.limit_eval_batches=2")
NOT_TRAINING = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}


def train_args(argv: list[str]) -> list[str] | None:
    """The arguments after train.py of `python train.py ...` or `torchrun ... train.py ...`, else None."""
    is_python = bool(argv) and Path(argv[0]).name.startswith("python")
    if (is_python or (argv and argv[0] == "torchrun")) and "train.py" in argv:
        return argv[argv.index("train.py") + 1:]
    return None


def appends_for(command: str) -> list[str]:
    """What is appended to a README command to keep it short: only to train.py runs that train for long.

    Not to `debug=...` runs (short by design, and the limits would change what they check), nor to --cfg or
    --help. A resume from a checkpoint keeps its max_epochs: the checkpoint has trained one epoch already."""
    args = train_args(shlex.split(command))
    if args is None or NOT_TRAINING & set(args) or any(a.startswith("debug=") for a in args):
        return []
    resumes_a_file = any(a.startswith("trainer.resume=") and a != "trainer.resume=auto" for a in args)
    return [*([] if resumes_a_file else [APPENDS_EPOCHS]), *APPENDS_LIMITS]


# ----------------------------------------------------------------------------------------------- running


@dataclass
class Result:
    command: str          # as written in the README
    ran: str              # what bash ran: substituted, with the appends
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    started: float
    new_runs: list[Path]  # outputs/<date>/<time>/ directories it created
    new_sweeps: list[Path]  # outputs/multirun/<date>/<time>/
    new_evals: list[Path]   # outputs/eval/<date>/<time>/
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"`{self.ran}` exited {self.returncode} after {self.seconds:.1f} s\n--- stdout (end)\n"
                f"{self.stdout[-3000:]}\n--- stderr (end)\n{self.stderr[-5000:]}")


class ReadmeSession:
    """The fresh copy, and the README commands run in it so far (each at most once)."""

    def __init__(self, copy: Path, tmp: Path, mirror: Path, env: dict[str, str]):
        self.copy, self.tmp, self.mirror, self.env = copy, tmp, mirror, env
        self.results: dict[str, Result] = {}
        self.running: list[str] = []

    # placeholders
    def fixture_path(self, name: str) -> str:
        # A user's first folder (issue 29): 51 images, PNG and JPEG of three sizes, one training batch an epoch
        if name == "image_folder" and not (self.tmp / "photos").exists():
            mixed_folder(self.tmp / "photos", ["cat", "dog", "fish"], 51)
        if name == "arrays" and not (self.tmp / "arrays.npz").exists():
            x, y = arrays(1400, 4, 12, 12, 1)
            np.savez(self.tmp / "arrays.npz", train_x=x[..., 0], train_y=y)
        labels = {"pets": self.tmp / "pets" / "labels.csv", "dials": self.tmp / "dials.csv"}
        for folder, kind in (("pets", "multi_hot"), ("dials", "values")):
            if name.startswith(folder) and not (self.tmp / folder).exists():  # 8 training batches of 128
                labelled_folder(self.tmp / folder, labels[folder], kind, 1350)
        return str({"provision_root": self.tmp / "provision_root", "mirror": self.mirror,
                    "image_folder": self.tmp / "photos", "arrays": self.tmp / "arrays.npz",
                    "pets": self.tmp / "pets", "pets_labels": labels["pets"], "dials": self.tmp / "dials",
                    "dials_labels": labels["dials"]}[name])

    def made(self, key: str, made: Made) -> str:
        if made.command in SKIP or made.command not in {c.text for c in COMMANDS}:
            raise AssertionError(f"{key!r}: SUBSTITUTIONS names `{made.command}`, which is not a README command "
                                 "that runs")
        result = self.run(made.command)
        if result.returncode != 0:
            raise AssertionError(f"{key!r} comes from `{made.command}`, which failed:\n{result.describe()}")
        bases = result.new_sweeps if " -m " in f" {made.command} " else result.new_runs
        assert len(bases) == 1, f"{key!r}: `{made.command}` made {len(bases)} run directories, not 1: {bases}"
        matches = sorted(bases[0].glob(made.path)) if made.path else [bases[0]]
        assert len(matches) == 1, f"{key!r}: {len(matches)} matches of {made.path!r} in {bases[0]}: {matches}"
        return str(matches[0].relative_to(self.copy))

    def substitute(self, command: str) -> str:
        unknown = unknown_placeholders(command)
        assert not unknown, (f"`{command}` has placeholders that SUBSTITUTIONS does not cover: {unknown}; add them "
                             "(or the command to SKIP, with the reason)")
        table = {**SUBSTITUTIONS, **SUBSTITUTIONS_IN.get(command, {})}
        for key in sorted(table, key=len, reverse=True):
            if _token(key).search(command):
                where = table[key]
                value = self.fixture_path(where.name) if isinstance(where, Fixture) else self.made(key, where)
                command = _token(key).sub(lambda _: value, command)
        return command

    # running
    def run(self, command: str) -> Result:
        if command not in self.results:
            assert command not in self.running, f"SUBSTITUTIONS make `{command}` depend on itself: {self.running}"
            self.running.append(command)
            try:
                ran = " ".join([self.substitute(command), *appends_for(command)])
                self.results[command] = self._execute(command, ran)
            finally:
                self.running.pop()
        return self.results[command]

    def _snapshot(self) -> dict[str, set[Path]]:
        out = self.copy / "outputs"
        return {"runs": set(out.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]/*")),
                "sweeps": set(out.glob("multirun/*/*")), "evals": set(out.glob("eval/*/*"))}

    def _execute(self, command: str, ran: str) -> Result:
        extra: dict = {}
        argv = shlex.split(ran)
        if argv[0] == "make":
            dry = subprocess.run(["make", "-n", *argv[1:]], cwd=self.copy, env=self.env, capture_output=True, text=True)
            assert "pip install" not in dry.stdout and "-m venv" not in dry.stdout, (
                f"`{ran}` would (re)install .venv, which is a link to {REPO / '.venv'}; not run:\n{dry.stdout}")
            extra["installed_mtime"] = (self.copy / ".venv" / ".installed").stat().st_mtime
        before, started = self._snapshot(), time.time()
        if command in SERVERS:
            returncode, stdout, stderr = self._serve(ran, SERVERS[command], extra)
        else:
            proc = subprocess.Popen(["bash", "-c", ran], cwd=self.copy, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                stderr += f"\n[test_readme_commands: killed after {TIMEOUT_S} s]"
            returncode = proc.returncode
        after = self._snapshot()
        new = {k: sorted(after[k] - before[k]) for k in after}
        return Result(command, ran, returncode, stdout, stderr, time.time() - started, started, new["runs"],
                      new["sweeps"], new["evals"], extra)

    def _serve(self, ran: str, banner: str, extra: dict) -> tuple[int, str, str]:
        """Start a server command as written, wait for its banner, read its run list over HTTP, Ctrl-C it."""
        # Ctrl-C in a terminal reaches a server that takes SIGINT. A test session started in the background by a
        # shell without job control (`bash .ci/run &`, as CI may be) inherits SIGINT ignored, and Python then
        # never installs its KeyboardInterrupt handler: TensorBoard ignored the test's Ctrl-C in every such run.
        proc = subprocess.Popen(["bash", "-c", ran], cwd=self.copy, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
        out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        readers = [threading.Thread(target=lambda s=s, k=k: out[k].extend(iter(s.readline, "")), daemon=True)
                   for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for r in readers:
            r.start()
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline and proc.poll() is None:
            found = re.search(banner, "".join(out["stderr"] + out["stdout"]))
            url = found.group(1) if found else None
            time.sleep(0.2)
        if url is not None:
            extra["url"] = url
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
            while time.time() < deadline:  # the server loads the event files in the background
                try:
                    extra["runs"] = json.loads(opener.open(f"{url}/data/runs", timeout=10).read())
                except OSError as e:
                    extra["http_error"] = repr(e)
                if extra.get("runs"):
                    break
                time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # "Press CTRL+C to quit"
            sent = time.time()
            try:
                proc.wait(timeout=30)
                extra["sigint_to_exit_s"] = round(time.time() - sent, 1)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                extra["needed_sigkill"] = True
            extra["stopped_by_test"] = True
        for r in readers:
            r.join(timeout=10)
        return proc.returncode, "".join(out["stdout"]), "".join(out["stderr"])


# ------------------------------------------------------------------------------------------- the fixture


def fresh_copy(repo: Path, dest: Path) -> None:
    """The files git knows (tracked, and untracked but not ignored), with their modification times."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = repo / name
        if not src.exists() and not src.is_symlink():
            continue  # tracked, deleted in the work tree
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)
    # What `make setup` leaves in a clone: .venv with .installed newer than pyproject.toml (else make reinstalls).
    (dest / ".venv").symlink_to(repo / ".venv", target_is_directory=True)
    installed = repo / ".venv" / ".installed"
    if installed.exists() and (dest / "pyproject.toml").stat().st_mtime >= installed.stat().st_mtime:
        then = installed.stat().st_mtime - 1
        os.utime(dest / "pyproject.toml", (then, then))


def idx_array(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def draw_sevens(copy: Path) -> None:
    """digit.png and photo_of_a_seven.jpg: two sevens of the MNIST test set as a user would have them."""
    from PIL import Image

    raw = copy / "data" / "MNIST" / "raw"
    images, labels = idx_array(raw / "t10k-images-idx3-ubyte"), idx_array(raw / "t10k-labels-idx1-ubyte")
    first, second = np.flatnonzero(labels == 7)[:2]
    Image.fromarray(255 - images[first]).resize((84, 84)).save(copy / "digit.png")  # dark ink on white, grey
    page = Image.new("RGB", (160, 160), (236, 232, 220))  # a seven on off-white paper, in colour
    ink = Image.fromarray(255 - images[second]).resize((100, 100)).convert("RGB")
    page.paste(Image.blend(ink, Image.new("RGB", ink.size, (236, 232, 220)), 0.1), (30, 30))
    page.save(copy / "photo_of_a_seven.jpg", quality=90)


@pytest.fixture(scope="session")
def readme(tmp_path_factory, request) -> ReadmeSession:
    from trainer.data.provision import provision

    tmp = tmp_path_factory.mktemp("readme")
    copy = tmp / REPO.name
    fresh_copy(REPO, copy)
    # Never written to: ../shared is read as a mirror; else real_root provisions the checkout's data/ offline.
    mirror = SHARED_MIRROR if SHARED_MIRROR.is_dir() else request.getfixturevalue("real_root")
    for name in ("MNIST", "FashionMNIST"):
        provision(name, copy / "data", download=True, mirror=mirror)
    draw_sevens(copy)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy / "src")
    where = subprocess.run(["bash", "-c", "python -c 'import trainer; print(trainer.__file__)'"], cwd=copy, env=env,
                           capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(copy / "src")), where
    return ReadmeSession(copy, tmp, mirror, env)


# ---------------------------------------------------------------------------------------------- checking


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def config_value(copy: Path, group_file: str, dotted: str):
    node = yaml.safe_load((copy / "configs" / group_file).read_text())
    for part in dotted.split("."):
        node = node[part]
    return node


def expected_jobs(copy: Path, args: list[str]) -> int:
    """How many jobs a `-m` command starts: Optuna's n_trials, or the product of the comma lists and ranges."""
    search = next((a.split("=", 1)[1] for a in args if a.startswith("hparams_search=")), None)
    if search is not None:
        given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.sweeper.n_trials=")]
        if given:
            return int(given[-1])
        return config_value(copy, f"hparams_search/{search}.yaml", "hydra.sweeper.n_trials")
    jobs = 1
    for a in args:
        key, _, value = a.partition("=")
        ranged = re.fullmatch(r"range\((\d+)\)", value)
        if ranged:  # Hydra's range(n): n values
            jobs *= int(ranged[1])
        elif value and "[" not in value and not key.startswith("hydra."):
            jobs *= value.count(",") + 1
    return jobs


def check_train(s: ReadmeSession, r: Result, args: list[str], torchrun: bool) -> None:
    text = r.stdout + r.stderr
    if "--cfg" in args:
        config = yaml.safe_load(r.stdout)
        assert {"dataset", "model", "optimizer", "trainer"} <= set(config), r.stdout[:2000]
        return
    if "--help" in args:
        assert "== Configuration groups ==" in r.stdout and re.search(r"^model: .*\bcnn\b", r.stdout, re.M), r.stdout
        return
    if "-m" in args or "--multirun" in args:
        assert len(r.new_sweeps) == 1, f"{len(r.new_sweeps)} sweep directories: {r.new_sweeps}"
        jobs = sorted(d.parent for d in r.new_sweeps[0].glob("*/.hydra"))
        assert len(jobs) == expected_jobs(s.copy, args), jobs
        unfinished = [j.name for j in jobs if not (j / "metrics.json").is_file()]
        assert not unfinished, f"jobs without metrics.json (failed): {unfinished}"
        if any(a.startswith("hparams_search=") for a in args):
            assert (r.new_sweeps[0] / "optimization_results.yaml").is_file()
        return
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("trainer.resume=")), None)
    assert len(r.new_runs) == 1, f"{len(r.new_runs)} run directories: {r.new_runs}"
    if resume not in (None, "auto"):  # continues the checkpoint's run directory
        assert "resumed" in text, text[-3000:]
        metrics_file = s.copy / Path(resume).parent.parent / "metrics.json"
        assert metrics_file.is_file() and metrics_file.stat().st_mtime >= r.started, f"{metrics_file} not rewritten"
        epochs = [int(a.split("=", 1)[1]) for a in args if a.startswith("trainer.max_epochs=")]
        want = epochs[-1] if epochs else config_value(s.copy, "trainer/default.yaml", "max_epochs")
        assert read_json(metrics_file)["epochs"] == want
        return
    run = r.new_runs[0]
    metrics = read_json(run / "metrics.json")
    # the task's main test metric (a preset picks its task): a regression's error, a multi-label task's mean average
    # precision, an embedding's 1-NN accuracy, a classifier's accuracy
    main = next(k for k in ("test/mae", "test/map", "test/knn_acc", "test/acc") if k in metrics)
    assert 0 <= metrics[main] and (main == "test/mae" or metrics[main] <= 1), metrics
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert overrides == args, "the run's overrides are not the command's"
    if resume == "auto":
        assert "starting a new run" in text or "continuing" in text, text[-3000:]
    if torchrun:
        nproc = next(int(a.split("=", 1)[1]) for a in shlex.split(r.ran) if a.startswith("--nproc_per_node="))
        assert metrics["world_size"] == nproc


def check_result(s: ReadmeSession, r: Result) -> None:  # noqa: C901, PLR0915 (one branch per kind of command)
    """What each kind of README command promises, beyond exit 0 and no traceback."""
    argv = shlex.split(r.ran)
    args = train_args(argv)
    if args is not None:
        return check_train(s, r, args, torchrun=argv[0] == "torchrun")
    program = argv[1] if Path(argv[0]).name.startswith("python") and len(argv) > 1 else argv[0]
    if argv[:2] == ["make", "train"]:
        assert len(r.new_runs) == 1, r.new_runs
        assert read_json(r.new_runs[0] / "metrics.json")["test/acc"] > 0.9
        assert (s.copy / ".venv" / ".installed").stat().st_mtime == r.extra["installed_mtime"], "make reinstalled"
    elif argv[:2] == ["make", "lint"]:
        assert "All checks passed!" in r.stdout, r.stdout  # ruff over the copy, with pyproject.toml's rules
    elif program == "eval.py":
        assert len(r.new_evals) == 1, r.new_evals
        split = next((a.split("=", 1)[1] for a in argv if a.startswith("split=")), "test")
        assert 0 <= read_json(r.new_evals[0] / "metrics.json")[f"{split}/acc"] <= 1
        assert (r.new_evals[0] / "confusion_matrix.csv").is_file()
    elif program == "scripts/predict.py":
        images = [a for a in argv[3:] if not a.startswith("--") and Path(a).suffix in (".png", ".jpg", ".jpeg")]
        top = int(argv[argv.index("--top") + 1]) if "--top" in argv else 1
        lines = r.stdout.splitlines()
        assert len(lines) == len(images), r.stdout
        for image, line in zip(images, lines):
            fields = line.split()
            assert fields[0] == image and line.count("%") == top, line
            assert fields[1] == "7", f"a seven read as {line}"
    elif program == "scripts/export.py":
        formats = argv[argv.index("--format") + 1:] if "--format" in argv else ["torchscript", "onnx"]
        formats = [f for f in formats if f in ("torchscript", "onnx")]
        lines = [line for line in r.stdout.splitlines() if line.split(":")[0] in formats]
        assert sorted(line.split(":")[0] for line in lines) == sorted(formats), r.stdout
        for line in lines:
            path = s.copy / line.split()[1]
            assert path.is_file() and path.stat().st_mtime >= r.started, line
            if "--out" in argv:
                assert path.parent.resolve() == (s.copy / argv[argv.index("--out") + 1]).resolve(), line
        if "--batches" in argv and argv[argv.index("--batches") + 1] == "40":  # "40 test batches: all of MNIST's"
            assert all("10001 test images" in line for line in lines), r.stdout
    elif program == "scripts/summarize.py":
        if "--format" in argv and argv[argv.index("--format") + 1] == "markdown":
            assert r.stdout.startswith("| run |") and "finished" in r.stdout, r.stdout
        else:
            sweep = s.copy / argv[2]
            jobs = list(sweep.glob("*/.hydra"))
            folds = re.search(r"\(folds ([\d,]+)\)\s+(\d+) folds ", r.stdout)  # a k-fold sweep: one row of them
            if folds:
                assert len(folds[1].split(",")) == int(folds[2]) == len(jobs) and " ± " in r.stdout, r.stdout
            else:
                assert r.stdout.count("finished") == len(jobs) > 0, r.stdout
    elif program == "scripts/provision_data.py":
        root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else s.copy / "data"
        names = [a for a in argv[2:] if not a.startswith("--") and a not in
                 (argv[argv.index(o) + 1] for o in ("--root", "--mirror") if o in argv)] or ["MNIST", "FashionMNIST"]
        for name in names:
            assert f"{name}: ok" in r.stdout, r.stdout
            assert len(list((root / name / "raw").glob("*-ubyte"))) == 4
    elif program == "scripts/make_task_data.py":  # data/tasks/<name>.npz, a tensors file the presets read
        made = s.copy / "data" / "tasks" / f"{argv[2]}.npz"
        assert r.stdout.startswith(f"wrote data/tasks/{argv[2]}.npz"), r.stdout
        with np.load(made, allow_pickle=False) as arrays:
            assert {"train_x", "train_y", "test_x", "test_y", "classes"} <= set(arrays.files)
    elif program == "scripts/benchmark.py" and "--mnist-fast" in argv:  # one row per seed, then the mean
        seeds = int(argv[argv.index("--mnist-fast") + 1])
        rows = re.findall(r"^\s*(\d+|mean)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\d+$", r.stdout, re.M)
        assert [s for s, _ in rows] == [*map(str, range(seeds)), "mean"], r.stdout
        assert float(rows[-1][1]) >= 0.99, r.stdout  # what the preset promises: >= 99.0% mean (docs/configs.md)
    elif program == "scripts/benchmark.py":
        after = argv[argv.index("--models") + 1:] if "--models" in argv else []
        models = list(itertools.takewhile(lambda a: not a.startswith("-"), after)) or ["logistic", "mlp", "cnn"]
        assert "samples/s" in r.stdout, r.stdout
        for model in models:
            assert re.search(rf"^cpu\s+{model}\s", r.stdout, re.M), r.stdout
    elif program == "scripts/lr_find.py":  # its suggestion, the train.py command with it, and its files
        suggested = re.search(r"suggested learning rate: (\S+)", r.stdout)
        assert suggested and f"optimizer.lr={suggested[1]}" in r.stdout.splitlines()[-1], r.stdout
        (run_dir,) = sorted((s.copy / "outputs" / "lr_find").glob("*/*"))[-1:]
        assert {"lr_find.png", "lr_find.json"} <= {p.name for p in run_dir.iterdir()}, list(run_dir.iterdir())
    elif program == "tensorboard":
        assert r.extra.get("url"), "no 'TensorBoard ... at http://...' line"
        assert r.extra.get("runs"), f"the server listed no runs: {r.extra}"
        assert not r.extra.get("needed_sigkill"), "Ctrl-C did not stop it"
    else:
        raise AssertionError(f"no check for `{r.ran}`: add one to check_result")


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("command", COMMANDS, ids=[c.text for c in COMMANDS])
def test_readme_command(command: Command, readme: ReadmeSession):
    if command.text in SKIP:
        pytest.skip(SKIP[command.text])
    result = readme.run(command.text)
    assert "Traceback" not in result.stderr, result.describe()
    if command.text in EXPECT_FAIL:
        assert result.returncode != 0 and EXPECT_FAIL[command.text] in result.stderr, result.describe()
        return
    stopped = result.extra.get("stopped_by_test") and result.returncode in (0, -signal.SIGINT, 130)
    assert result.returncode == 0 or stopped, result.describe()
    try:
        check_result(readme, result)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{result.describe()}") from None


def test_every_listed_command_is_still_in_the_readme():
    texts = {c.text for c in COMMANDS}
    for table in (SKIP, EXPECT_FAIL, SERVERS, SUBSTITUTIONS_IN):
        assert not set(table) - texts, f"no longer in the README: {set(table) - texts}"
    tables = [(SUBSTITUTIONS, texts), *((t, {c}) for c, t in SUBSTITUTIONS_IN.items())]
    for table, commands in tables:
        for key, where in table.items():
            assert any(_token(key).search(t) for t in commands), f"placeholder {key!r} is no longer in {commands}"
            if isinstance(where, Made):
                assert where.command in texts and where.command not in SKIP, where


def test_every_command_that_runs_has_known_placeholders_only():
    unknown = {c.text: unknown_placeholders(c.text) for c in COMMANDS if c.text not in SKIP}
    assert not {k: v for k, v in unknown.items() if v}, unknown


def test_skipped_installs_are_installed():
    """The extras the skipped `pip install -e '.[...]'` lines would install are in this venv."""
    import importlib.util

    for module in ("hydra_plugins.hydra_submitit_launcher", "hydra_plugins.hydra_optuna_sweeper",
                   "hydra_plugins.hydra_joblib_launcher", "joblib", "onnx",
                   "onnxscript", "onnxruntime", "torchmetrics", "mlflow"):
        assert importlib.util.find_spec(module) is not None, module


def test_parser_reads_commands_comments_continuations_and_skips_output(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("\n".join([
        "text `python not_a_command.py`", "```bash", "# a comment", "python a.py x=1   # what it does",
        "pip install -e '.[x]'  # it's the 'x' extra", "torchrun --a=1 \\", "  --b=2 train.py   # two machines",
        "# output: 99.8%", "echo '# not a comment' \"#\" a#b", "", "```", "```", "python in_a_plain_block.py", "```",
        "```python", "print('python code')", "```", "```console", "$ python b.py  # c", "b's output",
        "$ python c.py", "```"]))
    assert [(c.text, c.where) for c in readme_commands([md], tmp_path)] == [
        ("python a.py x=1", "guide.md:4"), ("pip install -e '.[x]'", "guide.md:5"),
        ("torchrun --a=1 --b=2 train.py", "guide.md:6"), ("echo '# not a comment' \"#\" a#b", "guide.md:9"),
        ("python b.py", "guide.md:19"), ("python c.py", "guide.md:21")]
    assert unknown_placeholders("python x.py outputs/2025-01-01/10-00-00-1/a.pt <dir> ... /etc x=/abs") == [
        "2025-01-01/10-00-00", "<dir>", "...", "/etc", "/abs"]
    assert unknown_placeholders("python eval.py ckpt=.../best.pt --root /data sqlite:///study.db") == []
    assert appends_for("python train.py trainer.resume=outputs/a/last.pt") == list(APPENDS_LIMITS)
    assert appends_for("python train.py --cfg job") == appends_for("python scripts/summarize.py outputs") == []
