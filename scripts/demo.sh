#!/usr/bin/env bash
# The main job: set everything up, then run the two-peer demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m btns_vici.demo "$@"
