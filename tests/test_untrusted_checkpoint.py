"""A checkpoint is untrusted input: nothing stored in it may choose code to run or a path to write.

Each attack is a checkpoint that loads fine with `weights_only=True` (only plain values in it) but whose
stored config, handed to Hydra's instantiate as it is, would write a file. Every consumer must refuse it
with one line, and the file must not exist afterwards: resume (train.py), eval.py, scripts/predict.py,
scripts/export.py, all through `load_checkpoint` and `rebuildable_config`.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import pytest
import torch
from conftest import REPO, run_train
from omegaconf import OmegaConf

from trainer.cli import export, predict  # noqa: E402
from trainer.cli.config import build, model_from_checkpoint, rebuildable_config
from trainer.cli.paths import CONFIG_DIR, REPO_ROOT
from trainer.errors import UserError
from trainer.run.checkpoint import load_checkpoint, save_checkpoint

CHOICES = {"dataset": "mnist", "model": "mlp", "loss": "cross_entropy", "optimizer": "adam", "scheduler": "onecycle",
           "trainer": "default", "logger": "tensorboard", "distributed": "default", "experiment": None, "debug": None}


def trained_state(choices: dict = CHOICES, overrides: tuple[str, ...] = ("model.hidden_sizes=[8]",)) -> dict:
    """A checkpoint as train.py writes it (version 2), for an untrained model composed from `choices`."""
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra.compose("train", [f"{g}={o}" for g, o in choices.items() if o is not None] + list(overrides))
    model = build(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    return {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "batch_in_epoch": 0,
            "global_step": 10, "rng": {}, "config": OmegaConf.to_container(cfg, resolve=True), "choices": choices}


def write(path: Path, state: dict) -> Path:
    save_checkpoint(path, {**state, "config": OmegaConf.to_yaml(state["config"])})
    return path


def write_text_attack(target: Path) -> dict:
    return {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(target)]},
                                                             "import os  # written by a checkpoint"]}


# name -> (how the stored config is changed, given the file the attack would write; what the refusal names)
ATTACKS = {
    "write_text": (lambda c, f: c.update(model={"_target_": "builtins.dict", "x": write_text_attack(f)}),
                   "model.x._target_"),
    "open": (lambda c, f: c.update(model={"_target_": "builtins.open", "_args_": [str(f), "w"]}), "model._args_"),
    "copyfile": (lambda c, f: c.update(model={"_target_": "shutil.copyfile",
                                              "_args_": [str(REPO / "README.md"), str(f)]}),
                 "model._args_"),
    "nested_target_in_a_list": (lambda c, f: c["model"].update(hidden_sizes=[8, write_text_attack(f)]),
                                "model.hidden_sizes[1]"),
    "open_as_the_loss": (lambda c, f: c.update(loss={"_target_": "builtins.open", "file": str(f), "mode": "w"}),
                         "loss._target_=builtins.open"),
    "real_class_not_the_option": (lambda c, f: c["model"].update(_target_="torch.nn.Linear"),
                                  "model._target_=torch.nn.Linear"),
    "project_class_not_the_option": (lambda c, f: c["model"].update(_target_="trainer.models.cnn.CNN"),
                                     "model._target_=trainer.models.cnn.CNN"),
    "nested_partial": (lambda c, f: c["dataset"].update(extra={"_partial_": True}), "dataset.extra._partial_"),
    "recursive_key": (lambda c, f: c["optimizer"].update(_recursive_=True), "optimizer._recursive_"),
    "unknown_key": (lambda c, f: c["model"].update(width=3), "model.width"),
    "wrong_type": (lambda c, f: c["model"].update(hidden_sizes="[8]"), "model.hidden_sizes='[8]'"),
    "choice_outside_the_options": (lambda c, f: None, "model=../../../elsewhere/evil"),
    # found by a review: a plain string that Hydra's instantiate resolves into a node with a _target_
    "interpolation_creating_a_target": (
        lambda c, f: c["model"].update(activation="${oc.create:{_target_: shutil.copyfile, _args_: ['"
                                                  + str(REPO / "README.md") + "', '" + str(f) + "']}}"),
        "model.activation is an interpolation"),
    "interpolation_reading_the_environment": (lambda c, f: c["dataset"].update(mirror="${oc.env:HOME}"),
                                              "dataset.mirror is an interpolation"),
}


def attacking(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """(checkpoint, the file it would write, the text the refusal must contain)."""
    change, names = ATTACKS[name]
    target = tmp_path / "written-by-checkpoint.pth"
    state = trained_state()
    change(state["config"], target)
    if name == "choice_outside_the_options":
        state["choices"] = {**CHOICES, "model": "../../../elsewhere/evil"}
    return write(tmp_path / "evil.pt", state), target, names


def one_line_refusal(error: UserError, names: str) -> None:
    message = str(error)
    assert "\n" not in message and names in message and "refusing" in message, message


@pytest.mark.parametrize("name", ATTACKS)
def test_every_consumer_refuses_the_attack_in_one_line_and_writes_nothing(tmp_path, name):
    ckpt, target, names = attacking(tmp_path, name)
    consumers = {"model_from_checkpoint": lambda: model_from_checkpoint(ckpt),
                 "predict": lambda: predict.predict(str(ckpt), [REPO / "docs" / "tensorboard_images.png"], 1),
                 "export": lambda: export.export(str(ckpt), ["torchscript"], tmp_path / "exports", 1)}
    for consumer, run in consumers.items():
        with pytest.raises(UserError) as refused:
            run()
        one_line_refusal(refused.value, names)
        assert not target.exists(), consumer
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("name", ["write_text", "copyfile", "open_as_the_loss", "interpolation_creating_a_target"])
def test_commands_refuse_the_attack_exactly_as_users_run_them(tmp_path, name):
    ckpt, target, names = attacking(tmp_path, name)
    for command in (["eval.py", f"ckpt={ckpt}"],
                    ["scripts/predict.py", str(ckpt), str(REPO / "docs/tensorboard_images.png")],
                    ["scripts/export.py", str(ckpt)], ["train.py", f"trainer.resume={ckpt}", "trainer.device=cpu"]):
        result = run_train(*command[1:], script=command[0])
        assert result.returncode == 1, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
        assert not target.exists(), command


@pytest.mark.parametrize("text, says", [
    ("x: &a [*a]\n", "uses a YAML alias"),  # refers to itself: endless recursion
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n"
                                                     for p, k in zip("abcdefgh", "bcdefghi")), "uses a YAML alias"),
    ("a: [" + "1, " * 400_000 + "1]\n", "characters long"),
])
def test_a_stored_config_that_expands_without_end_is_refused_at_once(tmp_path, text, says):
    """YAML aliases ("billion laughs") would make a small file an endless or exponential structure."""
    state = trained_state()
    save_checkpoint(tmp_path / "c.pt", {**state, "config": text})
    with pytest.raises(UserError, match=says):
        load_checkpoint(tmp_path / "c.pt")


def test_a_model_from_the_users_own_module_needs_trust(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Sequential):\n"
        "    def __init__(self, in_shape, num_classes, width):\n"
        "        pixels = in_shape[0] * in_shape[1] * in_shape[2]\n"
        "        super().__init__(torch.nn.Flatten(), torch.nn.Linear(pixels, width),\n"
        "                         torch.nn.ReLU(), torch.nn.Linear(width, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # the option of a model of the user's own (model=custom: no schema, so a key of its own is added with +)
    state = trained_state(choices={**CHOICES, "model": "custom"},
                          overrides=("model._target_=mypkg.net.Net", "+model.width=5"))
    model = build(OmegaConf.create(state["config"]["model"]), in_shape=(1, 28, 28), num_classes=10)
    state["model"] = model.state_dict()
    ckpt = write(tmp_path / "mine.pt", state)
    with pytest.raises(UserError, match="trust_checkpoint=true") as refused:
        model_from_checkpoint(ckpt)
    assert "model._target_=mypkg.net.Net" in str(refused.value)
    restored = model_from_checkpoint(ckpt, trust=True)
    assert type(restored.model).__name__ == "Net" and restored.model[1].out_features == 5


def test_values_come_from_the_file_classes_and_paths_from_this_checkout(tmp_path):
    state = trained_state(overrides=("model.hidden_sizes=[8]", "model.activation=GELU", "dataset.mean=0.5"))
    state["config"]["dataset"]["root"] = str(tmp_path / "a" / "path" / "to" / "write")
    state["config"]["trainer"]["checkpoint_dir"] = "../../elsewhere"
    config = rebuildable_config(load_checkpoint(write(tmp_path / "c.pt", state)))
    assert config.model == {"_target_": "trainer.models.mlp.MLP", "hidden_sizes": [8], "activation": "GELU",
                            "dropout": 0.0}
    assert config.dataset.mean == 0.5 and config.dataset.root == str(REPO_ROOT / "data")
    assert config.trainer.checkpoint_dir == "checkpoints"
    assert rebuildable_config(load_checkpoint(tmp_path / "c.pt"), data_root="/x").dataset.root == "/x"


def test_a_version_1_checkpoint_is_migrated_by_its_classes(tmp_path):
    state = trained_state()
    del state["choices"]
    path = tmp_path / "v1.pt"
    torch.save({"format": "hydra-torch-trainer", "version": 1, **state, "config": OmegaConf.to_yaml(state["config"])},
               path)
    restored = model_from_checkpoint(path)
    assert type(restored.model).__name__ == "MLP" and restored.config.model.hidden_sizes == [8]
    state["config"]["model"]["_target_"] = "torch.nn.Linear"  # no option has this class: refused
    torch.save({"format": "hydra-torch-trainer", "version": 1, **state, "config": OmegaConf.to_yaml(state["config"])},
               path)
    with pytest.raises(UserError, match=r"model._target_=torch.nn.Linear is not one of the model options"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("version, says", [(99, "newer version of this framework (checkpoint version 99; this code "
                                                 "reads 1 to 3)"),
                                           (0, "checkpoint version 0 is not one"), ("2", "checkpoint version '2'")])
def test_checkpoint_versions_newer_or_unknown_are_refused(tmp_path, version, says):
    state = trained_state()
    torch.save({"format": "hydra-torch-trainer", **state, "config": OmegaConf.to_yaml(state["config"]),
                "version": version}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=f"^{tmp_path / 'c.pt'}.*" + says.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(tmp_path / "c.pt")


def test_a_smuggled_pickle_of_a_blocked_module_is_named(tmp_path):
    """torch 2.14 words a blocked module's global differently ("unsupported GLOBAL posix.system ... blocked")."""
    class System:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"format": "hydra-torch-trainer", "payload": System()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=rf"refusing to load .* pickled {os.name}.system object.*nothing in it was run"):
        load_checkpoint(tmp_path / "evil.pt")
