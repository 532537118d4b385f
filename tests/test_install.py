"""The package as a user installs it: a wheel built from this checkout, installed (not editable) into a new virtual
environment; then docs/your_project.md and docs/python_api.md run as written from a folder outside the checkout.

The new environment gets only the wheel. Its dependencies (torch and the rest, gigabytes) are this environment's,
reached through a .pth path line: that adds the folder for imports only, so this checkout's editable install (a
finder that a .pth in that folder would install) is not seen there. `trainer` and its configs come from the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("htt-train", "htt-eval", "htt-predict", "htt-export", "htt-lr-find", "htt-summarize", "htt-data",
            "htt-make-data")
RUN = "outputs/<date>/<time>"  # the guide's placeholder for the run its first command made

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]


def guide(name: str) -> tuple[dict[str, str], list[str]]:
    """The files (`<!-- file: PATH -->` blocks) and the commands (the `<!-- commands -->` block) of docs/NAME."""
    text = (REPO / "docs" / name).read_text()
    files = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.S))
    blocks = re.findall(r"<!-- commands -->\n```bash\n(.*?)```", text, re.S)
    return files, [line for block in blocks for line in block.splitlines() if line.strip()]


def project_of_the_guide(folder: Path) -> list[str]:
    """docs/your_project.md's files written into `folder`; returns the guide's commands."""
    files, commands = guide("your_project.md")
    assert {"mydata.py", "mynet.py", "configs/experiment/stripes.yaml"} <= set(files) and len(commands) == 7
    for path, body in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(body)
    return commands


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the build reads (it writes build/ and egg-info beside its sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed; returns its bin/ folder."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    (purelib,) = (env / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return env / "bin"


def user_env(bin_dir: Path) -> dict[str, str]:
    """A user's shell with the new environment activated: its bin/ first on PATH, no PYTHONPATH. The dependencies'
    own commands (torchrun) are this environment's, as their modules are: its bin/ comes next."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    path = os.pathsep.join([str(bin_dir), sysconfig.get_paths()["scripts"], env.get("PATH", "")])
    return {**env, "PATH": path, "VIRTUAL_ENV": str(bin_dir.parent)}


def run(command: str, cwd: Path, bin_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=cwd, env=user_env(bin_dir), capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_every_module_and_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"trainer/{p.relative_to(REPO / 'src' / 'trainer')}" for p in (REPO / "src" / "trainer").rglob("*.py")}
    configs = {f"trainer/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert modules - names == set(), "pyproject.toml's packages miss these modules"
    assert configs - names == set(), "pyproject.toml's package data misses these config files"
    assert not {n for n in names if n.startswith(("tests/", "scripts/", "docs/"))}


def test_the_installed_commands_run_from_the_wheel_with_its_configs(venv, tmp_path):
    for command in COMMANDS:
        assert (venv / command).is_file(), command
    where = run("python -c 'import trainer.cli.paths as p; print(p.__file__, p.CONFIG_SOURCE)'", tmp_path, venv)
    module, source = where.stdout.split()
    assert Path(module).is_relative_to(venv.parent) and source == "pkg://trainer.configs", where.stdout
    help_text = run("htt-train --help", tmp_path, venv)
    assert help_text.returncode == 0 and "model: cnn, custom, logistic, mlp, torchvision" in help_text.stdout, \
        help_text.stdout + help_text.stderr
    for command in ("htt-predict --help", "htt-export --help", "htt-summarize --help", "htt-data --help",
                    "htt-make-data --help"):
        result = run(command, tmp_path, venv)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {command.split()[0]}"), result.stderr
    made = run("htt-make-data counts --train 40 --test 8", tmp_path, venv)  # where the presets read it: ./data/tasks
    assert made.returncode == 0 and (tmp_path / "data" / "tasks" / "counts.npz").is_file(), made.stderr


def test_your_own_project_guide_runs_as_written(venv, tmp_path):
    """docs/your_project.md in a new folder outside the checkout: train, resume, train on, eval, predict, summarize."""
    project = tmp_path / "my_project"
    commands = project_of_the_guide(project)
    outputs = project / "outputs"

    def runs() -> list[Path]:  # a resuming process's own directory holds only its log: the run is where it continued
        return sorted(p.parent for p in outputs.glob("*/*/checkpoints"))

    train, resume_auto, train_on, evaluate, samples, predict, summarize = commands
    result = run(train, project, venv)
    assert result.returncode == 0, result.stderr
    (run_dir,) = runs()  # in the project's own outputs/, not the install's or the checkout's
    assert "TinyNet on" in result.stdout and "Stripes" in result.stdout
    assert (run_dir / "metrics.json").is_file() and (run_dir / "train.log").is_file()

    # A run killed after its last checkpoint, before its test: no metrics.json (that is what unfinished means).
    (run_dir / "metrics.json").unlink()
    result = run(resume_auto, project, venv)
    assert result.returncode == 0, result.stderr
    assert f"continuing {run_dir / 'checkpoints' / 'last.pt'}" in result.stdout, result.stdout
    assert runs() == [run_dir] and (run_dir / "metrics.json").is_file()

    relative = str(run_dir.relative_to(project))
    result = run(train_on.replace(RUN, relative), project, venv)
    assert result.returncode == 0, result.stderr
    assert "epoch 5/6" in result.stdout and "epoch 6/6" in result.stdout and runs() == [run_dir]

    result = run(evaluate.replace(RUN, relative), project, venv)
    assert result.returncode == 0, result.stderr
    (evaluation,) = (outputs / "eval").glob("*/*/metrics.json")
    assert float(re.search(r'"test/acc": ([\d.]+)', evaluation.read_text())[1]) >= 0.95, evaluation.read_text()

    assert run(samples, project, venv).returncode == 0
    result = run(predict.replace(RUN, relative), project, venv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("samples/top.png  0 'top'") and lines[1].startswith("samples/bottom.png  3 'bottom'"), \
        result.stdout

    result = run(summarize, project, venv)
    assert result.returncode == 0 and result.stdout.count("finished") == 1 and relative.split("/", 1)[1] in \
        result.stdout, result.stdout + result.stderr


def test_a_users_option_is_refused_without_its_config_dir_in_one_line(venv, tmp_path):
    """eval rebuilds only from options it can see: without --config-dir it names the option and the flag."""
    project = tmp_path / "p"
    commands = project_of_the_guide(project)
    (project / "configs" / "model" / "cnn.yaml").write_text("_target_: mynet.TinyNet\n")  # a shipped option's name
    trained = run(commands[0] + " trainer.max_epochs=1", project, venv)
    assert trained.returncode == 0, trained.stderr
    assert f"{project / 'configs' / 'model' / 'cnn.yaml'} is not used: the shipped option" in trained.stdout
    (ckpt,) = project.glob("outputs/*/*/checkpoints/best.pt")
    result = run(f"htt-eval ckpt={ckpt.relative_to(project)}", project, venv)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "dataset=stripes, which is not one of the dataset options" in result.stderr, result.stderr
    assert "--config-dir DIR" in result.stderr
    result = run("htt-train experiment=stripes", project, venv)  # the preset of ./configs, without the flag
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.rstrip().endswith("./configs/experiment/stripes.yaml is here: add --config-dir configs")


def test_the_installed_command_trains_under_torchrun(venv, tmp_path):
    """docs/your_project.md's torchrun line: the installed command as torchrun's program, 2 CPU processes."""
    text = (REPO / "docs" / "your_project.md").read_text()
    command = " ".join(re.search(r"`(torchrun --standalone [^`]*)`", text, re.S)[1].split())
    project_of_the_guide(tmp_path)
    result = run(command, tmp_path, venv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (gloo)" in result.stdout and len(list(tmp_path.glob("outputs/*/*/metrics.json"))) == 1


def test_a_file_in_the_current_folder_never_replaces_an_installed_package(venv, tmp_path):
    """The current folder comes after the installed packages on the import path: a torch.py there is not torch."""
    (tmp_path / "torch.py").write_text("raise SystemExit('the torch.py of the current folder was imported')\n")
    result = run("htt-eval", tmp_path, venv)
    assert result.returncode == 1 and result.stderr.startswith("error: ckpt is required"), result.stderr


def test_the_python_api_example_runs_as_written(venv, tmp_path):
    """docs/python_api.md's example, as a script of the user's, against the installed package: no Hydra."""
    text = (REPO / "docs" / "python_api.md").read_text()
    (code,) = re.findall(r"<!-- python-api example[^\n]*-->\n```python\n(.*?)```", text, re.S)
    (tmp_path / "example.py").write_text(code)
    result = run("python example.py", tmp_path, venv)
    assert result.returncode == 0, result.stderr
    run_dir, _, rest = result.stdout.strip().splitlines()[-1].partition(" ")
    assert (tmp_path / run_dir / "checkpoints" / "best.pt").is_file(), result.stdout
    assert float(re.search(r"'test/acc': ([\d.]+)", rest)[1]) >= 0.95, rest
    assert "epoch 3/3" in result.stdout + result.stderr
