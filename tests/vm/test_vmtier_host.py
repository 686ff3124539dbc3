"""The VM tier's host plumbing (runs on the host, no VM): junit results map back onto node ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.junitxml import mangle_test_address

from .vmtier import junit_key, parse_junit

NODEIDS = [
    "tests/vm/test_x.py::test_plain",
    "tests/vm/test_x.py::test_param[4-a/b]",
    "tests/vm/test_x.py::TestClass::test_method",
]


@pytest.mark.parametrize("nodeid", NODEIDS)
def test_junit_key_is_pytests_own_mangling(nodeid: str) -> None:
    names = mangle_test_address(nodeid)
    assert junit_key(nodeid) == (".".join(names[:-1]), names[-1])


def test_outcomes_of_a_real_junit_file(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    print('guest says hi')\n    assert 1 == 2, 'boom'\n"
        "def test_skip():\n    pytest.skip('no esp here')\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('setup broke')\n"
        "def test_error(broken):\n    pass\n"
    )
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-o",
            "junit_logging=system-out",
            f"--junitxml={junit}",
            "test_sample.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    outcomes = parse_junit(junit)
    status = {name: o.status for (_, name), o in outcomes.items()}
    assert status == {"test_ok": "passed", "test_bad": "failed", "test_skip": "skipped", "test_error": "failed"}
    bad = next(o for (_, name), o in outcomes.items() if name == "test_bad")
    assert "boom" in bad.text and "guest says hi" in bad.text
    assert "setup broke" in next(o for (_, n), o in outcomes.items() if n == "test_error").text
    assert junit_key("test_sample.py::test_ok") in outcomes


def test_a_silent_guest_is_detected_and_killed_quickly(tmp_path):
    import time

    from .vmtier import _SILENT, _boot_and_run

    t0 = time.monotonic()
    rc = _boot_and_run(["sleep", "30"], tmp_path, {}, tmp_path / "c.log", timeout=60, first_output=1.0)
    assert rc == _SILENT and time.monotonic() - t0 < 5
    rc = _boot_and_run(
        ["sh", "-c", "echo guest; exit 3"], tmp_path, {}, tmp_path / "d.log", timeout=60, first_output=1.0
    )
    assert rc == 3 and (tmp_path / "d.log").read_text() == "guest\n"
