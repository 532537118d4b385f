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










