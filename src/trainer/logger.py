"""Run logging to TensorBoard."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    """Scalars and text into a TensorBoard event file under `log_dir`.

    `purge_step`: on resume, TensorBoard hides events from this step on that the interrupted run
    wrote after its checkpoint, so curves have neither duplicated nor missing steps.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it off module import

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Indented by four spaces, TensorBoard's markdown shows it verbatim (YAML keeps its layout).
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def flush(self) -> None:
        """Hand everything logged so far to the OS (it survives a kill of this process)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
