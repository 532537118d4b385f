#!/usr/bin/env python
"""The checkout's way to run `htt-data` (src/trainer/cli/provision_data.py); `--help` says how to use it."""

from trainer.cli.entry import data

if __name__ == "__main__":
    data()
