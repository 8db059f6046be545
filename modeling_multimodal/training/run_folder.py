"""One run per output folder: a lock that dies with its process, and no silent mixing with an older run.

- `RunLock` holds an exclusive `fcntl.flock` on `<output_dir>/.train.lock` for the whole run. The kernel
  drops it when the process exits (killed or not), so there is no stale lock to clean up; a second
  trainer on the same folder fails at once, naming the folder and the holder's pid.
- `prepare_output_dir` refuses a new run in a folder that holds checkpoints (another run's: pruning and
  `--resume` would mix the two) unless the run resumes or the recipe asks to overwrite, and refuses
  `--resume` when there is nothing complete to resume from.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from .checkpointing import CHECKPOINT_PATTERN, latest_checkpoint

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
# What a run writes into its folder (removed by an explicit overwrite; anything else is left alone).
RUN_OUTPUTS = ("final", "logs", "log_history.json", "report.png")


class RunLock:
    """An exclusive, non-blocking lock on `output_dir` for as long as this object is held (or the process lives)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / LOCK_NAME
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise ValueError(
                f"output_dir {self.output_dir} is in use by another training run (pid {holder}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` folder, complete or not, and interrupted `checkpoint-N.tmp` writes."""
    if not output_dir.is_dir():
        return []
    return [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name.removesuffix(".tmp"))]


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, is_main: bool = True) -> Path | None:
    """Check the folder for this run; return the checkpoint to resume from (None for a fresh run).

    Call it while holding the `RunLock` (main process) so that no other run changes the folder meanwhile.
    """
    output_dir = Path(output_dir)
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume: output_dir {output_dir} holds no complete checkpoint to resume from "
                "(set save_steps so a run writes them, or start without --resume)"
            )
        return checkpoint
    existing = sorted(p.name for p in checkpoint_folders(output_dir))
    if existing and not overwrite:
        raise ValueError(
            f"output_dir {output_dir} holds another run's checkpoints ({', '.join(existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}): pass --resume to continue that run, or --overwrite "
            "(recipe key overwrite_output_dir=true) to replace it, or choose another output_dir"
        )
    if overwrite and is_main:
        for path in checkpoint_folders(output_dir) + [output_dir / name for name in RUN_OUTPUTS]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if existing:
            logger.warning("overwrite_output_dir: removed the previous run's checkpoints in %s", output_dir)
    return None
