"""Smoke test of the benchmark entry point at tiny sizes: it runs and writes the documented structure.

Never asserts timings (they depend on the machine); only that every section produced its fields.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = [  # (section, keys it must carry)
    ("train_vs_llava", {"ours", "llava", "speedup", "peak_memory_ratio", "sequence"}),
    ("train_vs_qwen2_audio", {"ours", "qwen2_audio", "speedup", "peak_memory_ratio", "encoder_frames_ours"}),
    ("frozen_vs_trainable_tower", {"frozen_tower", "trainable_tower", "activation_memory_ratio"}),
    ("mfu", {"fp32", "bf16", "flop_count"}),
    ("generate_vs_llava", {"ours", "llava", "throughput_ratio"}),
    ("decode_vs_media", {"1_images", "4_images", "decode_ratio", "vision_tower_calls_per_generate"}),
    ("packing", {"packed", "padded_random", "padded_length_grouped", "speedup_vs_padded_random", "real_tokens"}),
    ("scale_images", {"points"}),
    ("scale_video_frames", {"points"}),
    ("scale_audio_seconds", {"points"}),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Processors have their own benchmark script and owner; the smoke test covers the model benchmarks.
    command = [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out / "r.json"), "--markdown", str(out / "R.md"),
               "--only", "training", "generation", "packing", "scale"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "r.json").read_text()), (out / "R.md").read_text(), done.stdout


@pytest.mark.parametrize("section,keys", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_section_has_its_fields(quick_run, section, keys):
    results, _, _ = quick_run
    assert keys <= set(results[section])


def test_step_entries_carry_time_and_memory(quick_run):
    results, _, _ = quick_run
    for section, models in (("train_vs_llava", ("ours", "llava")), ("train_vs_qwen2_audio", ("ours", "qwen2_audio"))):
        for model in models:
            entry = results[section][model]
            assert {"step_s", "peak_mib", "step_peak_mib"} <= set(entry)
            assert entry["step_s"] > 0 and entry["peak_mib"] >= entry["step_peak_mib"] >= 0


def test_media_are_encoded_once_per_generate(quick_run):
    results, _, _ = quick_run
    assert results["decode_vs_media"]["vision_tower_calls_per_generate"] == 1


def test_scale_points_grow_in_media_tokens(quick_run):
    results, _, _ = quick_run
    for section in ("scale_images", "scale_video_frames", "scale_audio_seconds"):
        tokens = [point["media_tokens"] for point in results[section]["points"]]
        assert len(tokens) >= 3 and tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_machine_and_markdown(quick_run):
    results, markdown, stdout = quick_run
    machine = results["machine"]
    assert {"date", "nproc", "cpu_model", "torch"} <= set(machine) and machine["nproc"] >= 1
    assert machine["cpu_model"] in markdown and machine["torch"] in markdown and machine["date"] in markdown
    assert "| Benchmark | Ours | Reference | Ratio | Goal | Status |" in markdown
    assert "Train step time vs LLaVA" in stdout  # the table is printed too
