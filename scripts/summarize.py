#!/usr/bin/env python
"""The checkout's way to run `htt-summarize` (src/trainer/cli/summarize.py); `--help` says how to use it."""

from trainer.cli.entry import summarize

if __name__ == "__main__":
    summarize()
