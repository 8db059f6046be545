#!/usr/bin/env bash
# lmms-eval into .venv without its declared requirements: `pip install lmms-eval` would replace our CPU torch with a
# CUDA build (torch 2.14 + nvidia-* wheels, torchvision, wandb, ...). What its evaluator, task loader and CLI import
# is installed here instead, pinned where its other requirements conflict (chardet<7, typepy<2; filelock<4, whose filelock._api its evaluator patches). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
.venv/bin/python -c "import lmms_eval.evaluator, lmms_eval.__main__" 2>/dev/null && exit 0
$PIP install -q --no-deps lmms-eval==0.7.3 loguru jsonlines pytablewriter tqdm-multiprocess sqlitedict tenacity \
  DataProperty mbstrdecoder pathvalidate tabledata tcolorpy "typepy[datetime]<2,>=1.3.2" "chardet<7,>=3.0.4" \
  python-dateutil pytz six "filelock>=3.10,<4" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import lmms_eval.evaluator, lmms_eval.__main__, torch; print('lmms-eval ok; torch', torch.__version__)"
