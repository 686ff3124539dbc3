#!/usr/bin/env bash
# Idempotent set-up of everything btns-vici needs on Debian 12, as root:
# Debian packages, the Python virtualenv (.venv) with btns-vici, its plugins and its lab,
# and (with --vm / --libreswan / --compose) the extra parts of those test tiers.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  ca-certificates python3 python3-venv iproute2 procps kmod
  strongswan-charon strongswan-swanctl openssl libcharon-extra-plugins libstrongswan-extra-plugins
  qemu-system-x86 qemu-system-data busybox-static cpio linux-libc-dev
  podman runc debootstrap
  gcc pkg-config libpython3.11-dev valgrind
  zsh groff-base man-db
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
# test: pytest, hypothesis, prometheus_client; dev: ruff and mypy (scripts/test.sh lints and type-checks); cabi: cffi for the C ABI;
# web-test: the asyncio/web-server integrations and real servers (uvicorn, hypercorn) for their tests.
.venv/bin/pip install -q -e '.[test,dev,cabi,web-test]'
# The wheel is pure Python: the C ABI (libbtns-ipsec.so, ipsec_api.h, btns-ipsec.pc) is an
# explicit build step, into the venv's prefix (.venv/lib, .venv/include) for tests/cabi.
.venv/bin/btns-cabi build --prefix .venv >/dev/null
if [ -f plugins/btns-libreswan/pyproject.toml ]; then
  .venv/bin/pip install -q -e plugins/btns-libreswan
fi
# The lab (lab/: btns-lab): the testbeds, the demos, `btns testbed|demo` and the tests' fixtures.
.venv/bin/pip install -q -e 'lab[test]'
# The example backend of docs/backends.md: tests/integration/test_backend_minimal.py drives it
# through its entry point, as btns_vici finds any third-party backend.
.venv/bin/pip install -q -e examples/backend_minimal

for tier in "$@"; do
  case "$tier" in
    --vm) [ -x scripts/vm/setup.sh ] && scripts/vm/setup.sh ;;
    --libreswan) [ -x plugins/btns-libreswan/scripts/fetch-libreswan.sh ] && plugins/btns-libreswan/scripts/fetch-libreswan.sh >/dev/null ;;
    --compose) [ -x scripts/compose/setup.sh ] && scripts/compose/setup.sh ;;
    *) echo "setup: unknown option $tier" >&2; exit 2 ;;
  esac
done
echo "setup: ready"
