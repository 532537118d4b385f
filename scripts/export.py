#!/usr/bin/env python
"""The checkout's way to run `htt-export` (src/trainer/cli/export.py); `--help` says how to use it."""

from trainer.cli.entry import export

if __name__ == "__main__":
    export()
