"""A JSON-lines tracker for Accelerate: one line per `accelerator.log` call, easy to grep and plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class JSONLTracker(GeneralTracker):
    """Writes `{"step", "time", **values}` lines to `<logging_dir>/metrics.jsonl` (and the config to config.json)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, logging_dir: str | Path):  # not @on_main_process: that would create Accelerate's state early
        super().__init__()
        self.logging_dir = Path(logging_dir)
        self.path = self.logging_dir / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        (self.logging_dir / "config.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "time": time.time(), **{k: float(v) if hasattr(v, "item") else v for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    @on_main_process
    def drop_after(self, step: int) -> None:
        """Forget the lines logged after `step` (a resumed run logs those steps again), by an atomic rewrite."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (json.loads(line).get("step") or 0) <= step]
        if len(kept) != len(lines):
            partial = self.path.with_suffix(".jsonl.partial")
            partial.write_text("".join(kept))
            partial.replace(self.path)
