"""Finding runs under output_root: the unfinished run that trainer.resume=auto continues."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.errors import UserError
from trainer.run.untrusted import (
    load_yaml,
)

log = logging.getLogger(__name__)


def find_unfinished_run(output_root: Path, overrides: list[str], checkpoint_dir: str) -> Path | None:
    """`last.pt` of the newest unfinished run under `output_root` started with these command-line overrides.

    A run is unfinished when it has a checkpoint but no `metrics.json` (written after the final test).
    Overrides are compared as a set, ignoring `trainer.resume`, from each run's `.hydra/overrides.yaml`; a run
    whose overrides.yaml cannot be read (not a small regular file of plain YAML) is passed over with a warning.
    """
    def key(items: list[str]) -> set[str]:
        return {o for o in items if not o.startswith("trainer.resume=")}

    want, found = key(overrides), []
    for saved in output_root.rglob(".hydra/overrides.yaml"):
        run = saved.parent.parent
        last = run / checkpoint_dir / "last.pt"
        if not last.is_file() or (run / "metrics.json").exists():
            continue
        # A run directory copied in from elsewhere is read within bounds; one that cannot be read is no run to
        # continue, and must not stop every other resume=auto under output_root.
        try:
            saved_overrides = load_yaml(saved) or []
            if not (isinstance(saved_overrides, list) and all(isinstance(o, str) for o in saved_overrides)):
                raise UserError(f"{saved}: not a list of overrides (key=value strings)")
        except UserError as e:
            log.warning("trainer.resume=auto: passing over %s: %s", run, e)
            continue
        if key(saved_overrides) == want:
            found.append(last)
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if len(found) > 1:
        log.info("trainer.resume=auto: %d unfinished runs with these overrides; continuing the newest, %s, and "
                 "passing over %s", len(found), found[0], ", ".join(str(p) for p in found[1:]))
    return found[0] if found else None
