#!/usr/bin/env bash
# The dependency lower bounds of pyproject.toml, tested: a fresh venv with exactly the
# oldest allowed release of each runtime dependency, btns-vici installed from this tree,
# then the unit tests and the CLI tests (the CLI tests need root and strongSwan: they
# bring up the netns testbed, which is what exposes a pyroute2 that misreads sockets).
#   scripts/check-lower-bounds.sh [pytest args]   (default: tests/unit tests/cli)
# tests/packaging/test_lower_bounds.py runs it (about a minute, most of it pip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Keep in step with [project] dependencies and the cabi extra in pyproject.toml.
LOWER=(vici==5.9.3 pyroute2==0.7.12 pluggy==1.3.0 cryptography==41.0.0 cffi==1.16.0)
VENV=${BTNS_LOWER_VENV:-$(mktemp -d /tmp/btns-lower-XXXXXX)}
keep=${BTNS_LOWER_VENV:+1}
chmod 755 "$VENV"  # the CLI tests run the venv as nobody
trap '[ -n "$keep" ] || rm -rf "$VENV"' EXIT
"$PY" -m venv --clear "$VENV"
# The optional integrations' packages (not bounded here) so that their unit tests run too.
OPTIONAL=("prometheus_client>=0.17" "starlette>=0.37" "aiohttp>=3.9" "fastapi>=0.110" "httpx>=0.27")
"$VENV/bin/pip" install -q --disable-pip-version-check "${LOWER[@]}" "${OPTIONAL[@]}" "pytest>=7" "hypothesis>=6" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . -e lab 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" check
"$VENV/bin/python" - "${LOWER[@]}" <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert version(name) == want, f"{name} {version(name)} installed, {want} wanted"
print("lower bounds installed:", " ".join(sys.argv[1:]))
PY
if [ $# -eq 0 ]; then set -- tests/unit tests/cli; fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
