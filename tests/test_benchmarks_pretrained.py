"""The real-scale benchmark section: skipped with its reason without converted weights; with them (set
MODELING_MULTIMODAL_PRETRAINED to a `modeling-multimodal convert all` folder) a quick run reports consistent ratios.

Never asserts timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not part of the installed package
    sys.path.append(str(ROOT))

from benchmarks.bench_pretrained import FOLDERS, PRETRAINED_ENV, pretrained_folders  # noqa: E402
from benchmarks.report import pretrained_rows  # noqa: E402


def test_section_is_skipped_with_its_reason_without_weights(tmp_path):
    assert "pass --pretrained DIR" in pretrained_folders(None)
    (tmp_path / FOLDERS["text"]).mkdir()
    (tmp_path / FOLDERS["text"] / "config.json").write_text("{}")
    reason = pretrained_folders(str(tmp_path))
    assert FOLDERS["vision"] in reason and FOLDERS["audio"] in reason and FOLDERS["text"] not in reason
    rows = pretrained_rows({"pretrained": {"skipped": reason}})
    assert rows[0][1] == "skipped" and rows[0][-1] == reason


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(PRETRAINED_ENV), reason=f"set {PRETRAINED_ENV} to the converted weights folder")
def test_quick_real_scale_run_reports_consistent_ratios(tmp_path):
    command = [sys.executable, "benchmarks/run.py", "--quick", "--only", "pretrained", "--out", str(tmp_path / "r.json"),
               "--markdown", str(tmp_path / "R.md")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    for section, reference in (("pretrained_vs_llava", "llava"), ("pretrained_vs_qwen2_audio", "qwen2_audio")):
        entry = results[section]
        assert entry["speedup"] == pytest.approx(entry[reference]["step_s"] / entry["ours"]["step_s"], rel=1e-9)
        assert entry["peak_memory_ratio"] == pytest.approx(entry["ours"]["peak_mib"] / entry[reference]["peak_mib"], rel=1e-9)
        assert entry["flop_ratio"] > 1  # ours skips the logits of unlabelled positions (and Qwen2-Audio's 30 s padding)
    assert results["pretrained_vs_llava"]["image_tokens"] == 256
    assert 0 < results["pretrained_mfu"]["mfu"] < 1
    rerank = results["pretrained_rerank"]  # the cached scores are the whole-sequence ones (fp32 sums over 49k logits)
    assert rerank["max_abs_difference"] < 1e-2 and rerank["speedup"] == pytest.approx(rerank["whole_sequence_s"] / rerank["ours_s"])
    assert "Real scale, LoRA step vs LLaVA" in (tmp_path / "R.md").read_text()
