#!/usr/bin/env bash
# Build the sdist and the wheel into dist/ and run `twine check --strict` on them, with
# build and twine in a throwaway venv (neither is a dependency of btns-vici). Prints the
# wheel's size and file list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tools=$(mktemp -d /tmp/btns-disttools-XXXXXX)
trap 'rm -rf "$tools"' EXIT
"$PY" -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check build twine 2>&1 | grep -v "^WARNING: Location" || true
rm -rf dist
"$tools/bin/python" -m build --outdir dist . >/dev/null
"$tools/bin/twine" check --strict dist/*
ls -l dist
"$tools/bin/python" -m zipfile -l dist/*.whl
