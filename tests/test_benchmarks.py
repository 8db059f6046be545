"""The benchmark entry point at tiny sizes: every ratio it reports is the ratio of the numbers it reports.

Never asserts timings (they depend on the machine): the quotients, the token accounting and the media-encoded-once
count are what a reader of `benchmarks/RESULTS.md` relies on. A few minutes in a subprocess: marked `slow`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

RATIOS = [  # (section, reported ratio, numerator path, denominator path)
    ("train_vs_llava", "speedup", ("llava", "step_s"), ("ours", "step_s")),
    ("train_vs_llava", "peak_memory_ratio", ("ours", "peak_mib"), ("llava", "peak_mib")),
    ("train_vs_qwen2_audio", "speedup", ("qwen2_audio", "step_s"), ("ours", "step_s")),
    ("train_vs_qwen2_audio", "peak_memory_ratio", ("ours", "peak_mib"), ("qwen2_audio", "peak_mib")),
    ("train_vs_qwen2_audio", "flop_ratio", ("qwen2_audio", "step_flops_g"), ("ours", "step_flops_g")),
    ("frozen_vs_trainable_tower", "activation_memory_ratio", ("frozen_tower", "step_peak_mib"), ("trainable_tower", "step_peak_mib")),
    ("generate_vs_llava", "throughput_ratio", ("ours", "tokens_per_s"), ("llava", "tokens_per_s")),
    ("decode_vs_media", "decode_ratio", ("4_images", "decode_s"), ("1_images", "decode_s")),
    ("packing", "speedup_vs_padded_random", ("padded_random", "epoch_s"), ("packed", "epoch_s")),
    ("packing", "speedup_vs_padded_length_grouped", ("padded_length_grouped", "epoch_s"), ("packed", "epoch_s")),
    ("packing", "speedup_vs_packed_masked_row", ("packed_masked_row", "epoch_s"), ("packed", "epoch_s")),
]  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Processors have their own benchmark script and owner; the smoke test covers the model benchmarks.
    command = [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out / "r.json"), "--markdown", str(out / "R.md"),
               "--only", "training", "generation", "packing", "scale"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "r.json").read_text()), (out / "R.md").read_text(), done.stdout


@pytest.mark.parametrize("section, ratio, numerator, denominator", RATIOS, ids=[f"{c[0]}.{c[1]}" for c in RATIOS])
def test_reported_ratios_are_the_quotients_of_the_reported_numbers(quick_run, section, ratio, numerator, denominator):
    results, _, _ = quick_run
    entry = results[section]
    value = lambda path: entry[path[0]][path[1]]  # noqa: E731
    assert value(numerator) > 0 and value(denominator) > 0
    assert entry[ratio] == pytest.approx(value(numerator) / value(denominator), rel=1e-9)


def test_packing_trains_the_same_tokens_with_less_padding(quick_run):
    results, _, _ = quick_run
    packing = results["packing"]
    for plan in ("packed", "packed_masked_row", "padded_random", "padded_length_grouped"):
        assert packing[plan]["padding_fraction"] == pytest.approx(1 - packing["real_tokens"] / packing[plan]["positions"])
        assert packing[plan]["real_tokens_per_s"] == pytest.approx(packing["real_tokens"] / packing[plan]["epoch_s"])
    assert packing["packed"]["positions"] < packing["padded_random"]["positions"]


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
