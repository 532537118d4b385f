#!/usr/bin/env python
"""The checkout's way to run `htt-make-data` (src/trainer/cli/make_data.py); `--help` says how to use it."""

from trainer.cli.entry import make_data

if __name__ == "__main__":
    make_data()
