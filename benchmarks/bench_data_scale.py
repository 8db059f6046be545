"""Start-up time of the data layer per row: first start (no cache) and repeated start (lengths cached).

Writes N image-caption rows (all pointing at a handful of images), then, each in a fresh subprocess so peak
memory is per run: `load_manifest` + the length estimates the trainer computes (`cached_lengths`, parallel over
the cores) with an empty cache, then again with the cache from the first run. Prints ms/row and peak RSS.
Then the same rows streamed (`data.streaming`, training/streaming.py): the time to the first planned batch (what
a launch waits), the streamed rows per second through the whole epoch's plan (reading, path checks and length
estimates as training consumes them), against the indexed path's rows per second at its first start.

    python benchmarks/bench_data_scale.py --rows 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make(root: Path, rows: int) -> Path:
    from modeling_multimodal.demo_data import make_demo_data

    make_demo_data(root, seed=0, sizes={"image": {"train": 8, "validation": 0, "test": 0},
                                        "video": {"train": 0, "validation": 0, "test": 0},
                                        "speech": {"train": 0, "validation": 0, "test": 0}})
    base = [json.loads(line) for line in (root / "image_train.jsonl").read_text().splitlines()]
    manifest = root / f"rows_{rows}.jsonl"
    with open(manifest, "w") as out:
        for i in range(rows):
            row = base[i % len(base)]
            out.write(json.dumps({"id": f"r{i}", "image": row["image"], "caption": row["caption"]}) + "\n")
    return manifest


def _start(manifest: str, root: str, cache: str) -> None:
    """One start, in this process: read the manifest, estimate (or read) every row's length."""
    from modeling_multimodal.data.examples import ExampleEncoder, load_manifest
    from modeling_multimodal.data.length_cache import cached_lengths
    from modeling_multimodal.processing import MultimodalProcessor
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)
    start = time.perf_counter()
    rows = load_manifest(manifest, root, task="image_caption", cache_dir=os.path.join(cache, "hf"))
    lengths = cached_lengths(ExampleEncoder(processor, task="image_caption"), rows, os.path.join(cache, "lengths"))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": len(lengths), "peak_mb": peak}))


def _stream(manifest: str, root: str) -> None:
    """One streamed epoch's plan, in this process: seconds to the first batch and to the end, peak RSS."""
    from modeling_multimodal.data.examples import ExampleEncoder, load_manifest
    from modeling_multimodal.processing import MultimodalProcessor
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
    from modeling_multimodal.training.streaming import StreamingBatchSampler

    tokenizer = tiny_tokenizer()
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)
    start = time.perf_counter()
    rows = load_manifest(manifest, root, task="image_caption", streaming=True)
    sampler = StreamingBatchSampler([rows], [ExampleEncoder(processor, task="image_caption")], [1], 8, seed=0)
    batches = iter(sampler)
    count = len(next(batches))
    first = time.perf_counter() - start
    count += sum(len(batch) for batch in batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_batch_s": first, "seconds": seconds, "rows": count, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--_start", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_stream", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._start:
        return _start(*args._start)
    if args._stream:
        return _stream(*args._stream)
    print(f"{'rows':>8} {'first ms/row':>13} {'repeat s':>9} {'repeat ms/row':>14} {'peak MB (first)':>16} "
          f"{'stream 1st batch s':>19} {'stream rows/s':>14} {'indexed rows/s':>15} {'stream/indexed':>15} {'stream peak MB':>15}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            root, cache = Path(tmp) / "data", Path(tmp) / "cache"
            manifest = _make(root, rows)
            runs = []
            for _ in range(2):
                done = subprocess.run([sys.executable, __file__, "--_start", str(manifest), str(root), str(cache)],
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            first, repeat = runs
            done = subprocess.run([sys.executable, __file__, "--_stream", str(manifest), str(root)],
                                  capture_output=True, text=True, check=True)
            stream = json.loads(done.stdout.strip().splitlines()[-1])
            stream_rate, indexed_rate = stream["rows"] / stream["seconds"], rows / first["seconds"]
            print(f"{rows:>8} {first['seconds'] / rows * 1e3:>13.3f} {repeat['seconds']:>9.2f} "
                  f"{repeat['seconds'] / rows * 1e3:>14.4f} {first['peak_mb']:>16.0f} {stream['first_batch_s']:>19.2f} "
                  f"{stream_rate:>14.0f} {indexed_rate:>15.0f} {stream_rate / indexed_rate:>15.2f} {stream['peak_mb']:>15.0f}")


if __name__ == "__main__":
    main()
