"""Errors that are the user's to fix: `train.py` prints them as one line and exits non-zero."""


MAX_DEPTH = 32  # how deep a config or a file's YAML may nest (a resolved config nests 3 or 4 levels)


class UserError(Exception):
    """A bad config value, path or data file. The message names the bad value and what is allowed."""


class OutputError(UserError):
    """A file could not be written (disk full, read-only, no permission); earlier files are intact."""


def shown(value: object) -> str:
    """A value as the command line and the YAML spell it: true, false, null; other values as repr() shows them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def printable(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a newline as \\n, ESC as \\x1b), other
    characters as they are. Names that come from data (class folders, a checkpoint's dataset name) go through
    this before they reach a terminal or a log: a newline would forge a line of its own, an ANSI sequence
    would rewrite what the terminal shows."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def error_line(error: BaseException | str) -> str:
    """The one line a refused command prints: `error: <message>`, escaped (see printable)."""
    return f"error: {printable(str(error))}"


def is_number(value: object) -> bool:
    """An int or a float, but not a bool (which Python counts as an int: `lr=true` would be 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(name: str, value: object, low: int) -> int:
    """Return `value` if it is an integer >= `low`, else raise UserError naming `name` and the value."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{name}={shown(value)}: must be an integer >= {low}")
    return value


def require_bool(name: str, value: object) -> bool:
    """Return `value` if it is true or false, else raise UserError naming `name` and the value (a string such as
    "abc" would otherwise read as true)."""
    if not isinstance(value, bool):
        raise UserError(f"{name}={shown(value)}: must be true or false")
    return value


def one_line(text: str) -> str:
    """A multi-line message as one line: "a:\n\tx\n\ty\nb" -> "a: x, y; b"."""
    out, listing = "", False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Config search path:"):  # Hydra's list of where it looked: noise for a user
            break
        if not line or line.startswith(("full_key:", "object_type=")):  # OmegaConf's location lines repeat the key
            continue
        indented = raw[:1] in ("\t", " ")
        if not out:
            out = line
        elif out.endswith(":"):
            out += " " + line
        else:
            out = (out + ", " if indented and listing else out.removesuffix(".") + "; ") + line
        listing = indented or out.endswith(":")
    return out


def unknown_key_message(full_key: str, keys: list[str]) -> str:
    """`trainer.max_epoch: no such key (did you mean trainer.max_epochs?); trainer has ...`, one line."""
    import difflib

    parent, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    if not keys and parent:  # eval.py's dataset before a dataset option is chosen
        return (f"{full_key}: no such key; {parent} has no keys until an option of the {parent} group is chosen "
                f"({parent}=<option> {full_key}=...)")
    return (f"{full_key}: no such key{hint}; {parent or 'the config'} has {', '.join(sorted(keys))}; "
            f"to add a key of your own, write +{full_key}=...")


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
    import re
    import sys
    from pathlib import Path

    found = re.search(r"Could not find '([\w/.-]+)'", error)
    if not found or any(a.startswith(("--config-dir", "-cd")) for a in sys.argv[1:]):
        return ""
    option = Path("configs") / f"{found[1]}.yaml"
    return f"; ./{option} is here: add --config-dir configs" if option.is_file() else ""


def one_line_config_errors() -> None:
    """Make `@hydra.main` report a config error (an unknown option, a misspelt key, an override it cannot parse)
    as `error: <one line>` with exit code 1, as this project reports its own errors, instead of Hydra's
    several lines. HYDRA_FULL_ERROR=1 still shows Hydra's full trace; other exceptions are left to Hydra."""
    import os
    import sys

    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    try:  # a private function of hydra-core 1.3: another version keeps Hydra's own several-line messages
        from hydra._internal import utils as hydra_utils
        report = hydra_utils.run_and_report
    except (ImportError, AttributeError):
        return
    if getattr(report, "one_line", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                require_shallow_overrides(sys.argv[1:])
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)
            try:
                return func()
            except CompactHydraException as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
                parent = getattr(cause, "parent_node", None)
                if cause is not None and parent is not None and "not in struct" in str(cause) and cause.full_key:
                    message = unknown_key_message(cause.full_key, [str(k) for k in parent.keys()])
                else:
                    message = one_line(f"{e}\n{cause}" if cause is not None else str(e)) + _config_dir_hint(str(e))
                print(f"error: {message}", file=sys.stderr)
                sys.exit(1)
        return report(guarded)

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report
