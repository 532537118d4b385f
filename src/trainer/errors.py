"""Errors that are the user's to fix: `train.py` prints them as one line and exits non-zero."""


class UserError(Exception):
    """A bad config value, path or data file. The message names the bad value and what is allowed."""


class OutputError(UserError):
    """A file could not be written (disk full, read-only, no permission); earlier files are intact."""


def require_int(name: str, value: object, low: int) -> int:
    """Return `value` if it is an integer >= `low`, else raise UserError naming `name` and the value."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{name}={value!r}: must be an integer >= {low}")
    return value
