"""Config errors, one line each, at the command-line edge: Hydra's and OmegaConf's errors worded as this project
words its own, and overrides too deeply nested for Hydra's parser refused before it."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

from trainer.errors import MAX_DEPTH, UserError, one_line, shown


def unknown_key_message(full_key: str, keys: list[str], typed: bool = False) -> str:
    """`trainer.max_epoch: no such key (did you mean trainer.max_epochs?); trainer has ...`, one line. `typed`:
    the node has a schema, whose class takes no other key (no `+key=` advice then)."""
    import difflib

    parent, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    if not keys and parent:  # eval.py's dataset before a dataset option is chosen
        return (f"{full_key}: no such key; {parent} has no keys until an option of the {parent} group is chosen "
                f"({parent}=<option> {full_key}=...)")
    add = "" if typed else f"; to add a key of your own, write +{full_key}=..."
    return f"{full_key}: no such key{hint}; {parent or 'the config'} has {', '.join(sorted(keys))}{add}"


def nesting_depth(text: str) -> int:
    """How deep the brackets ([], {}, ()) of a command-line override nest, outside quoted strings."""
    depth = deepest = 0
    quote = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]})":
            depth -= 1
    return deepest


def require_shallow_overrides(overrides: list[str]) -> None:
    """Refuse (UserError) a command-line override nested deeper than MAX_DEPTH, before Hydra's parser,
    which recurses once per level and fails at a few hundred with a RecursionError thousands of lines long."""
    for override in overrides:
        depth = nesting_depth(override)
        if depth > MAX_DEPTH:
            raise UserError(f"{override.partition('=')[0]}=...: nested {depth} levels deep; at most "
                            f"{MAX_DEPTH} (a config nests 3 or 4)")


def _config_dir_hint(error: str) -> str:
    """`; ./configs/model/x.yaml is here: add --config-dir configs` for Hydra's "Could not find 'model/x'" when the
    current folder's configs/ has that option and no --config-dir was given (a user's project, run without it)."""
    found = re.search(r"Could not find '([\w/.-]+)'", error)
    if not found or any(a.startswith(("--config-dir", "-cd")) for a in sys.argv[1:]):
        return ""
    option = Path("configs") / f"{found[1]}.yaml"
    return f"; ./{option} is here: add --config-dir configs" if option.is_file() else ""


def config_error_line(error: BaseException) -> str:
    """One line for a config error (Hydra's, or OmegaConf's from the schema), in the command line's spelling:
    `dataset.batch_size=abc: must be an integer`, `trainer.precision=fp8: must be one of fp32, bf16, fp16`,
    `trainer.max_epoch: no such key (did you mean trainer.max_epochs?); ...`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    from trainer.cli.schema import expected

    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    parent = getattr(cause, "parent_node", None)
    if isinstance(cause, ValidationError) and cause.full_key and parent is not None:
        key = re.sub(r"\[\d+\]$", "", cause.full_key)  # an item of a list: the list's key
        node = parent if not OmegaConf.is_list(parent) else parent._get_parent()
        schema = OmegaConf.get_type(node)
        override = re.search(r"Error merging override (\S+?)=(.*)$", str(error).splitlines()[0])
        given = f"{override[1]}={override[2]}" if override else f"{key}={shown(cause.value)}"
        if isinstance(schema, type) and schema is not dict:
            field = key.rpartition(".")[2]
            default = node.get(field) if OmegaConf.is_dict(node) else None
            # no spaces: the example pastes into a shell as one argument
            items = ",".join(str(v) for v in OmegaConf.to_object(default)) if OmegaConf.is_list(default) else None
            example = f", such as {key}=[{items}]" if items is not None else ""
            return f"{given}: must be {expected(schema, field)}{example}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and parent is not None and cause.full_key:
        schema = OmegaConf.get_type(parent)
        typed = isinstance(schema, type) and schema is not dict
        keys = [str(k) for k in parent.keys() if not str(k).startswith("_")]  # not _target_
        return unknown_key_message(cause.full_key, keys, typed)
    missing = re.search(r"Could not load '([\w.-]+)/([\w.-]+)'", str(error))
    if missing:  # an option listed in a group of several (metrics=[nope]), for which Hydra names no choices
        return _unknown_listed_option(*missing.groups())
    return one_line(f"{error}\n{cause}" if cause is not None else str(error)) + _config_dir_hint(str(error))


def _unknown_listed_option(group: str, option: str) -> str:
    """`metrics=[nope]`'s line: the group's options, shipped and --config-dir's, as Hydra lists them for a group
    that picks one."""
    from trainer.cli.paths import CONFIG_DIR

    args, dirs = sys.argv[1:], [CONFIG_DIR]
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(Path(args[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]))
    options = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
    return (f"Could not find '{group}/{option}': {group}=[...] lists options of {', '.join(options) or 'none'}; "
            f"an option of your own is configs/{group}/{option}.yaml, with --config-dir configs"
            + _config_dir_hint(f"Could not find '{group}/{option}'"))


def with_one_line_errors(main: Callable[[], object]) -> Callable[[], object]:
    """`main`, a `@hydra.main` function, with config errors printed as `error: <one line>` and exit code 1, as this
    project reports its own errors, instead of Hydra's several lines.

    Hydra prints an error itself unless HYDRA_FULL_ERROR=1, its documented switch, tells it to raise the error:
    this sets it for the command's process, and words what Hydra raises. A user who set it gets Hydra's full
    trace, as Hydra would show it."""

    def run() -> object:
        from hydra.errors import CompactHydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            require_shallow_overrides(sys.argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return main()
        except (CompactHydraException, OmegaConfBaseException) as e:
            if wants_trace:
                raise
            print(f"error: {config_error_line(e)}", file=sys.stderr)
            sys.exit(1)

    return run
