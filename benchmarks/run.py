"""Run every benchmark, print the table of ratios, write results JSON and RESULTS.md.

    python -m benchmarks.run --out benchmarks/results.json          # ~10 minutes on 2 CPU cores
    python -m benchmarks.run --quick --out /tmp/r.json --markdown /tmp/R.md   # tiny sizes, seconds
    python -m benchmarks.run --device cuda --out benchmarks/results_cuda.json --markdown benchmarks/RESULTS_cuda.md

`python benchmarks/run.py ...` works as well. `--only training generation` runs a subset.
The real-scale rows (`bench_pretrained.py`) need the converted SmolLM2 / DINOv2 / Whisper folders:

    python -m benchmarks.run --only pretrained --pretrained /tmp/pre --demo-data DEMO_DATA --out /tmp/pretrained.json

(`--pretrained` or MODELING_MULTIMODAL_PRETRAINED; without them the section is skipped and says why. The
packing row on the demo's own data also needs `--demo-data` or MODELING_MULTIMODAL_DEMO_DATA.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.bench_pretrained import DEMO_DATA_ENV, PRETRAINED_ENV  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from benchmarks.models import Sizes  # noqa: E402
from benchmarks.report import console_table, render_markdown  # noqa: E402

SECTIONS = ("training", "generation", "packing", "scale", "pretrained", "processors", "quantization")


def run_processors(sizes: Sizes, device: str) -> dict:
    """`benchmarks/bench_processors.py` (owned by the processor work) through its command line, when present.

    Its JSON (image / video / audio sections) becomes table rows; a failure is reported, not raised.
    """
    script = Path(__file__).parent / "bench_processors.py"
    if not script.exists():
        return {"processors": {"skipped": "benchmarks/bench_processors.py is not there yet"}}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "processors.json"
        command = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if sizes.vocab_size <= 1000 else [])
        done = subprocess.run(command, capture_output=True, text=True, cwd=script.parent.parent)
        if done.returncode != 0 or not out.exists():
            return {"processors": {"skipped": f"bench_processors.py exited {done.returncode}: {done.stderr.strip()[-300:]}"}}
        report = json.loads(out.read_text())
    rows = []
    image, video, audio = report.get("image", {}), report.get("video", {}), report.get("audio", {})
    if image:
        rows.append({"what": f"Image processor: images/s, ours vs CLIPImageProcessorPil ({image.get('num_images')} images)",
                     "ours": f"{image['ours_images_per_s']:.1f} img/s", "reference": f"{image['clip_pil_images_per_s']:.1f} img/s",
                     "ratio": f"{image['speedup']:.2f}×", "goal": "info", "status": "—"})
    if video:
        rows.append({"what": f"Video: {video['num_frames']} frames sampled from {video['total_frames']} "
                             f"({video['frames_decoded_by_sampling']} decoded) vs decoding every frame",
                     "ours": f"{1000 * video['sampling_s']:.0f} ms", "reference": f"{1000 * video['decode_every_frame_s']:.0f} ms",
                     "ratio": f"{video['speedup']:.2f}×", "goal": "info", "status": "—"})
    if audio:
        rows.append({"what": f"Audio features: {audio.get('input', '')}", "ours": f"{audio['audio_seconds_per_s']:.0f} audio s/s",
                     "reference": "", "ratio": "", "goal": "info", "status": "—"})
    return {"processors": {"report": report, "rows": rows}}


def run_section(name: str, sizes: Sizes, device: str) -> dict:
    if name == "processors":
        return run_processors(sizes, device)
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return module.run(sizes, device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results.json", help="results JSON path")
    parser.add_argument("--markdown", default=None, help="markdown table path (default: RESULTS.md next to --out)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); numbers mean nothing")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--pretrained", default=None, help=f"folder of converted weights for the real-scale rows (default: ${PRETRAINED_ENV})")
    parser.add_argument("--demo-data", default=None, help=f"demo data folder for the real-scale packing row (default: ${DEMO_DATA_ENV})")
    args = parser.parse_args(argv)
    if args.pretrained:
        os.environ[PRETRAINED_ENV] = args.pretrained
    if args.demo_data:
        os.environ[DEMO_DATA_ENV] = args.demo_data
    if args.threads or args.quick:  # tiny ops only lose to thread wake-ups on a busy machine
        torch.set_num_threads(args.threads or 1)

    sizes = Sizes.quick() if args.quick else Sizes.full()
    results = {"machine": machine_info(args.device), "quick": args.quick, "sizes": sizes.to_dict(), "sections_s": {}}
    for name in args.only:
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        results.update(run_section(name, sizes, args.device))
        results["sections_s"][name] = round(time.perf_counter() - start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = Path(args.markdown) if args.markdown else out.with_name("RESULTS.md")
    markdown.write_text(render_markdown(results))
    print(console_table(results))
    print(f"\nwrote {out} and {markdown}")
    return results


if __name__ == "__main__":
    main()
