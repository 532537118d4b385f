#!/usr/bin/env python
"""The checkout's way to run `htt-lr-find` (src/trainer/cli/lr_find.py); `--help` says how to use it."""

from trainer.cli.entry import lr_find

if __name__ == "__main__":
    lr_find()
