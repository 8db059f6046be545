"""Start-up work per row, done once: token-length estimates computed in parallel and cached beside the data.

`cached_lengths(encoder, rows, cache_dir)` returns `encoder.estimate_length` of every row. The lengths are
stored in `cache_dir` (the trainer uses `<data.root>/.modeling_multimodal_cache/`) as a little-endian int32
file named by a key over what decides them: the rows' `datasets` fingerprint (for files read by
`load_dataset`, derived from the files' paths, sizes and modification times, and from every map applied since,
path resolution and format reading included), the encoder's settings (`encoder_fingerprint`: the processor's
settings, the tokenizer's vocabulary, the task, max_length, assistant_turns). A repeated start or a resume
reads the file instead of re-reading every media header. Media files changed in place without touching the
manifest are not noticed (change the manifest, or delete the cache folder). A folder that cannot be written
is skipped with no error: the lengths are then computed every time.

First starts split the rows over the cores (`workers`, default `threads.available_threads()`: the cores this
process may use, shared among the processes on the machine): each worker
estimates a contiguous range, so the order is kept and peak memory does not grow with the rows beyond the
lengths themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ..threads import available_threads

PARALLEL_MIN_ROWS = 2_000  # below this, starting worker processes costs more than it saves


def encoder_fingerprint(encoder) -> str:
    """What decides an encoder's output for a given row: the whole processor, the task, max_length, turns."""
    digest, tokenizer = hashlib.sha256(), encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = json.loads(encoder.processor.to_json_string())
    for sub in [settings, *(v for v in settings.values() if isinstance(v, dict))]:
        sub.pop("auto_map", None)  # where the code lives (added when a checkpoint is exported), not what it does
    texts = (json.dumps(settings, sort_keys=True), vocabulary, repr(encoder.task), repr(encoder.max_length),
             repr(getattr(encoder, "assistant_turns", "all")))
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()


_WORKER_STATE: dict = {}


def _init_worker(encoder, rows) -> None:
    _WORKER_STATE.update(encoder=encoder, rows=rows)


def _estimate_range(bounds: tuple[int, int]) -> np.ndarray:
    encoder, rows = _WORKER_STATE["encoder"], _WORKER_STATE["rows"]
    return np.fromiter((encoder.estimate_length(rows[i]) for i in range(*bounds)), dtype=np.int32, count=bounds[1] - bounds[0])


def estimate_lengths_parallel(encoder, rows, workers: int | None = None) -> np.ndarray:
    """`encoder.estimate_length` of every row, in order, over `workers` processes (contiguous ranges)."""
    workers = workers or available_threads()  # the cores per process: torchrun's ranks share the machine
    if workers <= 1 or len(rows) < PARALLEL_MIN_ROWS:
        return np.fromiter((encoder.estimate_length(row) for row in rows), dtype=np.int32, count=len(rows))
    chunk = max(1, -(-len(rows) // (workers * 4)))
    bounds = [(start, min(start + chunk, len(rows))) for start in range(0, len(rows), chunk)]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(encoder, rows)) as pool:
        return np.concatenate(list(pool.map(_estimate_range, bounds)))


def lengths_key(encoder, rows) -> str | None:
    """The cache key of these rows' lengths, or None when the rows have no stable fingerprint."""
    fingerprint = getattr(rows, "_fingerprint", None)
    if fingerprint is None or not getattr(rows, "cache_files", None):
        return None  # an in-memory Dataset's fingerprint is random: nothing a later start could find
    return hashlib.sha256(f"{fingerprint}\0{encoder_fingerprint(encoder)}\0{len(rows)}".encode()).hexdigest()[:32]


def cached_lengths(encoder, rows, cache_dir: str | os.PathLike | None, workers: int | None = None) -> list[int]:
    """Every row's estimated length, read from `cache_dir` when computed before for the same key (module docstring)."""
    key = lengths_key(encoder, rows) if cache_dir is not None else None
    path = os.path.join(cache_dir, f"lengths-{key}.int32") if key else None
    if path and os.path.isfile(path):
        lengths = np.fromfile(path, dtype="<i4")
        if len(lengths) == len(rows):
            return lengths.tolist()
    lengths = estimate_lengths_parallel(encoder, rows, workers)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False, suffix=".tmp") as handle:
                lengths.astype("<i4").tofile(handle)
            os.replace(handle.name, path)  # atomic: a killed start never leaves half a file under the key
        except OSError:
            pass  # a read-only data folder: no cache, the lengths are computed again next time
    return lengths.tolist()


__all__ = ["cached_lengths", "encoder_fingerprint", "estimate_lengths_parallel", "lengths_key"]
