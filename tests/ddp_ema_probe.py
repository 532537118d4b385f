"""Run under torchrun by tests/test_distributed.py: train through train.setup (what train.py builds), then compare
each rank's EMA with rank 0's after every validation. Rank 0 prints one JSON line: the largest difference of any
EMA tensor between the ranks, per epoch."""

import json
import sys
from pathlib import Path

import torch.distributed as td
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
from trainer.cli import train  # noqa: E402
from trainer.cli.paths import prepare_hydra  # noqa: E402


def main() -> None:
    prepare_hydra()  # ${root_dir:}, as the command registers it
    run_dir = Path(sys.argv[1])
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[2:])
    trainer = train.setup(cfg, run_dir)
    diffs = []
    evaluate = trainer.evaluate

    def evaluate_and_compare(loader, prefix):
        metrics = evaluate(loader, prefix)
        state = {k: v.detach().double() for k, v in trainer.ema.module.state_dict().items()}
        states = [None] * td.get_world_size()
        td.all_gather_object(states, state)
        diffs.append(max(float((s[k] - states[0][k]).abs().max()) for s in states for k in state))
        return metrics

    trainer.evaluate = evaluate_and_compare
    trainer.fit()
    trainer.test()
    if td.get_rank() == 0:
        print(json.dumps({"ema_max_diff_per_evaluation": diffs}))


if __name__ == "__main__":
    main()
