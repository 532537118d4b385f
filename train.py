"""Train an image classifier: `python train.py model=cnn optimizer=adam trainer.max_epochs=3`.

The checkout's way to run `htt-train`: the composition root it runs is src/trainer/cli/train.py.
"""

from trainer.cli.entry import train

if __name__ == "__main__":
    train()
