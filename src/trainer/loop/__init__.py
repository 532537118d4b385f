"""The loop: the Trainer, one step's forward pass, metrics, schedules, EMA, CUDA graphs, stop signals and the
non-finite checks. It builds on run/ (state and checkpoints) and report/ (what a run shows)."""
