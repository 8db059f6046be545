#!/usr/bin/env bash
# The README's test command: set up from nothing, then run the default (non-slow) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
version=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
export TRANSFORMERS_TESTS_DIR=${TRANSFORMERS_TESTS_DIR:-$PWD/.cache/transformers-tests/$version/tests}
exec .venv/bin/pytest -m "not slow" "$@"
