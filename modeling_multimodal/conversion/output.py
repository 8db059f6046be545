"""Write a converted folder atomically and mark it complete.

A conversion writes into a hidden sibling folder, puts `COMPLETE_MARKER` there last and only then renames
it into place, so a killed conversion leaves no half-written folder behind: a folder without the marker
was not written by us (or by an older, killed run) and is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

COMPLETE_MARKER = "conversion_complete.json"


def is_complete(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a finished conversion (its marker is there)."""
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


@contextmanager
def atomic_output(out_dir: str | Path, source: str | Path | list, converter: str, overwrite: bool = False):
    """Yield a temporary folder to write into; on success mark it complete and move it to `out_dir`.

    Raises `FileExistsError` when `out_dir` already exists and `overwrite` is false (a finished folder is
    not rewritten by accident); with `overwrite`, the old folder is replaced only once the new one is done.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left over by a killed run
    partial.mkdir()
    try:
        yield partial
        sources = [str(s) for s in source] if isinstance(source, (list, tuple)) else str(source)
        (partial / COMPLETE_MARKER).write_text(json.dumps({"converter": converter, "source": sources}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def check_loads(model_class, folder: str | Path) -> None:
    """Load `folder` with `model_class.from_pretrained` and raise if any weight is missing, unexpected or misshapen.

    Run on the finished (temporary) folder before it is moved into place, so a wrong name mapping fails
    the conversion instead of leaving a folder whose model silently starts from random weights.
    """
    _, info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"the converted {model_class.__name__} folder does not load cleanly: " + "; ".join(
            f"{key} {sorted(map(str, values))[:5]}" for key, values in problems.items()))
