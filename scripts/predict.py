#!/usr/bin/env python
"""The checkout's way to run `htt-predict` (src/trainer/cli/predict.py); `--help` says how to use it."""

from trainer.cli.entry import predict

if __name__ == "__main__":
    predict()
