#!/usr/bin/env bash
# transformers' own common tests (ModelTesterMixin, ProcessorTesterMixin, ...) for the installed version: they are in
# its source distribution on PyPI, not in the wheel. Unpacks its tests/ folder into .cache/transformers-tests/<version>/
# (what scripts/test.sh points TRANSFORMERS_TESTS_DIR at). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
dest=.cache/transformers-tests/$version
[ -f "$dest/tests/test_modeling_common.py" ] && exit 0
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
.venv/bin/python -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$download" 2>&1 | grep -v "^WARNING: Location" || true
mkdir -p "$dest"
tar -xzf "$download/transformers-$version.tar.gz" -C "$dest" --strip-components=1 "transformers-$version/tests"
[ -f "$dest/tests/test_modeling_common.py" ] || { echo "transformers $version sdist has no tests/test_modeling_common.py" >&2; exit 1; }
