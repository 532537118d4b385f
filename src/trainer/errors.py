"""Errors that are the user's to fix: `train.py` prints them as one line and exits non-zero."""


class UserError(Exception):
    """A bad config value, path or data file. The message names the bad value and what is allowed."""
