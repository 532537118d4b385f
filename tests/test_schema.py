"""The schema (trainer/cli/schema.py) types every key of every shipped option, inherited options included, and a
value of the wrong type is one line in the command line's spelling. In-process: Hydra's compose API and the
formatter the commands use (the commands' own exit path is tested in test_train_cli.py's BAD table)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trainer.cli.config_errors import config_error_line
from trainer.cli.schema import SCHEMAS, Choice, expected

GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "trainer", "logger", "callbacks", "metrics",
          "distributed")
LISTED = ("logger", "callbacks", "metrics")  # a run picks several: option x is the node <group>.x
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((REPO / "configs" / g).glob("*.yaml"))]
UNTYPED = {("dataset", "custom"), ("model", "custom"),  # the user's own class: its keys are the user's
           ("metrics", "cohen_kappa")}  # torchmetrics' class: its keys are torchmetrics' (checked as it is built)


def node(group: str, option: str) -> tuple[str, object]:
    """The key of `option`'s node (`model`, `logger.csv`) and its composed config."""
    key = f"{group}.{option}" if group in LISTED else group
    return key, OmegaConf.select(composed(f"{group}={option}"), key)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigCompositionException) as caught:
        composed(*overrides)
    return config_error_line(caught.value)


def wrong_value(hint: object) -> str | None:
    """A value of another type than `hint` as the command line writes it; None for a key of any type."""
    if type(None) in typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return "5"
    if isinstance(hint, type) and issubclass(hint, Choice):
        return "nope"
    return {int: "abc", float: "abc", bool: "maybe"}.get(hint)


def test_every_shipped_option_but_the_users_own_has_a_schema():
    typed = [(g, o) for g, o in OPTIONS if (g, o) not in UNTYPED]
    schemas = {(g, o): OmegaConf.get_type(node(g, o)[1]) for g, o in typed}
    assert all(dataclasses.is_dataclass(s) for s in schemas.values()), schemas
    # an option that extends another (fashion_mnist: mnist; kmnist, emnist, cifar10, cifar100: torchvision) has
    # the schema of the one it extends
    assert schemas["dataset", "fashion_mnist"] is SCHEMAS["dataset"]["mnist"]
    assert {schemas["dataset", o] for o in ("kmnist", "emnist", "cifar10", "cifar100")} == \
        {SCHEMAS["dataset"]["torchvision"]}


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o not in UNTYPED])
def test_a_value_of_the_wrong_type_for_any_key_is_one_line_naming_it(group, option):
    key, config = node(group, option)
    schema = OmegaConf.get_type(config)
    assert dataclasses.is_dataclass(schema), schema
    checked = 0
    for name, hint in typing.get_type_hints(schema).items():
        bad = wrong_value(hint)
        if bad is None or name.startswith("_"):
            continue
        line = refusal(f"{group}={option}", f"{key}.{name}={bad}")
        assert line.startswith(f"{key}.{name}={bad}: must be {expected(schema, name)}"), line
        checked += 1
    strings = {k for k, h in typing.get_type_hints(schema).items() if wrong_value(h) is None and not k.startswith("_")}
    # model=torchvision's keys are names; loss.class_weights is null, auto or a list, which the loss checks
    assert checked or strings <= {"name", "weights", "class_weights"}, schema


def test_the_words_for_each_kind_of_type():
    assert refusal("dataset.batch_size=abc") == "dataset.batch_size=abc: must be an integer"
    assert refusal("optimizer.lr=abc") == "optimizer.lr=abc: must be a number"
    assert refusal("trainer.precision=fp8") == "trainer.precision=fp8: must be one of fp32, bf16, fp16"
    assert refusal("trainer.grad_clip_norm=abc") == "trainer.grad_clip_norm=abc: must be a number or null"
    assert refusal("trainer.deterministic=null") == "trainer.deterministic=null: must be true or false"
    assert refusal("optimizer.betas=0.9") == \
        "optimizer.betas=0.9: must be a list of numbers, such as optimizer.betas=[0.9,0.999]"
    assert refusal("model=mlp", "model.hidden_sizes=[64,a]") == \
        "model.hidden_sizes=[64,a]: must be a list of integers, such as model.hidden_sizes=[512,256]"
    # a key the schema does not have: the keys it has, without `_target_` and without "+key=" advice (the class
    # would not take another key)
    line = refusal("dataset.batch=3")
    assert line.startswith("dataset.batch: no such key (did you mean dataset.batch_size?); dataset has ")
    assert "_target_" not in line and "+dataset" not in line


def test_a_closed_choice_reaches_the_code_as_the_string_in_the_yaml():
    cfg = composed("trainer.precision=bf16", "scheduler=plateau")
    assert cfg.trainer.precision == "bf16" and f"{cfg.trainer.precision}" == "bf16"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert type(plain["trainer"]["precision"]) is str and plain["scheduler"]["mode"] == "max"
    assert "precision: bf16" in OmegaConf.to_yaml(cfg)  # as checkpoints store it
