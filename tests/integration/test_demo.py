"""The README's main job, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.testbed


def test_demo_runs_and_both_ends_agree() -> None:
    res = subprocess.run([sys.executable, "-m", "btns_lab.demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "A -> B: b'hello over IPsec'" in res.stdout
    assert res.stdout.count("[ok]") == 7 and "[FAIL]" not in res.stdout
    assert "authenticationMethod: BTNS" in res.stdout
