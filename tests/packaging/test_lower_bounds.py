"""The dependency lower bounds of pyproject.toml hold: scripts/check-lower-bounds.sh installs exactly
the oldest allowed releases into a fresh venv and runs the unit and CLI tests there (~35 s)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.packaging, pytest.mark.testbed]


def test_lower_bounds_pass_the_unit_and_cli_tests() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "check-lower-bounds.sh"), "tests/unit", "tests/cli"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "lower bounds installed: vici==5.9.3 pyroute2==0.7.12" in proc.stdout
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1], tail
