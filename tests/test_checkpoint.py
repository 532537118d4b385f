import os

import pytest
import torch
import yaml

from trainer.errors import UserError
from trainer.run.changes import config_changes
from trainer.run.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.run.files import atomic_write

STATE = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "epoch": 1, "global_step": 10,
         "rng": {}, "config": "a: 1\n"}


def test_roundtrip_is_weights_only_and_world_readable(tmp_path):
    save_checkpoint(tmp_path / "c.pt", STATE)
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.ones(2))
    torch.load(tmp_path / "c.pt", weights_only=True)
    assert os.stat(tmp_path / "c.pt").st_mode & 0o044  # not left at mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind


class Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create the file when unpickled


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned-by-checkpoint"
    torch.save({**STATE, "format": "hydra-torch-trainer", "payload": Evil(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load .* pickled io.open object"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not target.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: unrestricted loading runs it
    assert target.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
    (lambda p: p.write_text("hello"), "not a readable checkpoint"),
    (lambda p: (save_checkpoint(p, STATE), p.write_bytes(p.read_bytes()[:200])), "not a readable checkpoint"),
    (lambda p: torch.save({"w": torch.ones(1)}, p), "not a checkpoint of this framework"),
    (lambda p: torch.save({"format": "hydra-torch-trainer", "version": 2, "model": {}}, p), "missing optimizer"),
    (lambda p: torch.save({**STATE, "format": "hydra-torch-trainer", "version": 2, "epoch": -1}, p),
     "epoch=-1 is not a count"),
    (lambda p: torch.save({**STATE, "format": "hydra-torch-trainer", "version": 2, "config": "a: [1"}, p),
     "is not valid YAML"),
])
def test_unusable_checkpoints_are_explained(tmp_path, make, message):
    make(tmp_path / "c.pt")
    with pytest.raises(UserError, match=message):
        load_checkpoint(tmp_path / "c.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    save_checkpoint(tmp_path / "c.pt", STATE)
    before = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "c.pt") as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "c.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_state_roundtrips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np
    save_checkpoint(tmp_path / "c.pt", {**STATE, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_config_changes_harmless_vs_fatal():
    old = "model:\n  _target_: M\n  hidden: 8\ntrainer:\n  max_epochs: 1\ndataset:\n  _target_: D\n  batch_size: 8\n"
    saved = yaml.safe_load(old)
    assert config_changes(saved, old.replace("max_epochs: 1", "max_epochs: 5")) == ["trainer.max_epochs: 1 -> 5"]
    # the checkpoint named in trainer.resume is no change worth a line: every resume has it
    resumed = old.replace("max_epochs: 1", "max_epochs: 1\n  resume: outputs/x/checkpoints/last.pt")
    assert config_changes(yaml.safe_load(old.replace("max_epochs: 1", "max_epochs: 1\n  resume: null")), resumed) == []
    with pytest.raises(UserError, match="model.hidden: 8 in the checkpoint, 16 now"):
        config_changes(saved, old.replace("hidden: 8", "hidden: 16"))
    with pytest.raises(UserError, match="dataset._target_"):
        config_changes(saved, old.replace("_target_: D", "_target_: F"))


def test_a_resume_on_other_data_is_refused_in_one_line(tiny_root, tmp_path):
    """A checkpoint continued on data whose images differ (one pixel of one training image) is refused: the
    resumed run would train on, and report, data the first part never saw."""
    from conftest import MLP, TINY, run_train
    from image_data import with_one_pixel_changed

    first = run_train(*TINY, *MLP, f"dataset.root={tiny_root}", f"hydra.run.dir={tmp_path / 'run'}",
                      "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr
    changed = with_one_pixel_changed(tiny_root, tmp_path / "changed", "train")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    for root, refused in ((changed, True), (tiny_root, False)):
        resumed = run_train(*TINY, *MLP, f"dataset.root={root}", f"hydra.run.dir={tmp_path / str(refused)}",
                            "trainer.max_epochs=2", f"trainer.resume={last}")
        if refused:
            assert resumed.returncode == 1 and resumed.stderr.count("\n") == 1, resumed.stderr
            assert "it was trained on other data (images or labels differ" in resumed.stderr
        else:
            assert resumed.returncode == 0, resumed.stderr


def test_a_checkpoint_from_before_the_package_was_layered_names_the_moved_classes(tmp_path):
    """Written when the shipped schedulers, losses and logger lived in trainer.schedulers, trainer.losses and
    trainer.logger, and configs/trainer/default.yaml named trainer.Trainer: read as their new homes, so resume
    and eval compare it with today's options (the scheduler's class must match to resume). Its one logger is read
    as `logger.tensorboard`, the node of the option that a run now lists."""
    config = {"scheduler": {"_target_": "trainer.schedulers.onecycle", "pct_start": 0.25},
              "loss": {"_target_": "trainer.losses.NLLOnLogSoftmax"},
              "logger": {"_target_": "trainer.logger.TensorBoardLogger", "_partial_": True},
              "trainer": {"_target_": "trainer.Trainer", "max_epochs": 2},
              "model": {"_target_": "trainer.models.mlp.MLP"}}
    save_checkpoint(tmp_path / "old.pt", {**STATE, "config": yaml.safe_dump(config)})
    stored = load_checkpoint(tmp_path / "old.pt")["config"]
    assert stored["scheduler"]["_target_"] == "trainer.loop.schedulers.onecycle"
    assert stored["loss"]["_target_"] == "trainer.loop.losses.NLLOnLogSoftmax"
    assert stored["logger"] == {"tensorboard": {"_target_": "trainer.report.logger.TensorBoardLogger",
                                                "_partial_": True}}
    assert stored["trainer"] == {"max_epochs": 2} and stored["model"]["_target_"] == "trainer.models.mlp.MLP"
