"""Torch's intra-op threads: the cores this process may use, shared among the processes on this machine.

Torch starts as many threads as the machine has cores, whatever else runs: two processes (or any other
load) on a 2-core machine then make a step 10-20x slower. `train`, `evaluate` and `demo` call
`set_threads` first. The count is, in order: an explicit value (the recipe's `threads`, a command's
`--threads`), `OMP_NUM_THREADS` when set (torchrun sets it to 1 for several processes), else the cores
in this process's affinity mask divided by `LOCAL_WORLD_SIZE` (the processes on this machine).
"""

from __future__ import annotations

import os

import torch

_requested: int | None = None  # a command's --threads, kept for the trainers the command starts


def available_threads() -> int:
    """Threads per process when nothing is asked for (see the module docstring)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(cores // processes, 1)


def set_threads(threads: int | None = None, *, request: bool = False) -> int:
    """Set torch's intra-op threads and return the count; `request=True` also keeps it for later calls."""
    global _requested
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}: expected an integer >= 1")
    if request:
        _requested = threads
    count = threads or _requested or available_threads()
    torch.set_num_threads(count)
    return count
