"""Evaluate a trained checkpoint: `python eval.py ckpt=outputs/<date>/<time>/checkpoints/best.pt`.

The checkout's way to run `htt-eval` (src/trainer/cli/eval.py).
"""

from trainer.cli.entry import eval

if __name__ == "__main__":
    eval()
