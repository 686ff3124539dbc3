"""The host side of the VM tier: boot the VM once, run pytest in it, read its junit.xml back.

Used by tests/vm/conftest.py; pure helpers (junit_key, parse_junit) are unit-tested on the host.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "skipped"
    text: str = ""


@dataclass
class VMRun:
    """The outcome of the one guest run of this session."""

    outcomes: dict[tuple[str, str], Outcome]
    problem: str  # why the run as a whole went wrong, "" if it did not
    out_dir: Path
    seconds: float = 0.0


class VMFailure(Exception):
    """A test failed (or never reported) inside the VM."""


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) that pytest's junitxml writes for ``nodeid`` (its mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_junit(xml_path: Path) -> dict[tuple[str, str], Outcome]:
    outcomes = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        bad = [e for e in case if e.tag in ("failure", "error")]
        skipped = case.find("skipped")
        if bad:
            text = "\n".join(f"{e.get('message', '')}\n{e.text or ''}" for e in bad)
            out = case.find("system-out")
            if out is not None and out.text:
                text += f"\n--- captured stdout (in the VM) ---\n{out.text[-4000:]}"
            outcomes[key] = Outcome("failed", text)
        elif skipped is not None:
            outcomes[key] = Outcome("skipped", skipped.get("message", ""))
        else:
            outcomes[key] = Outcome("passed")
    return outcomes


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no console log)"


def run_in_vm(root: Path, nodeids: list[str]) -> VMRun:
    """Boot the VM once and run ``pytest -m vm`` on ``nodeids`` (relative to ``root``) there."""
    out = Path(tempfile.mkdtemp(prefix="btns-vm-out-"))
    console = out / "console.log"
    timeout = int(os.environ.get("BTNS_VM_TIMEOUT", "540"))
    cmd = [
        str(root / "scripts/vm/run.sh"), sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "vm",
        "-o", "junit_logging=system-out", f"--junitxml={out}/junit.xml", "-q", "-rA", *nodeids,
    ]
    env = {**os.environ, "BTNS_VM_OUT": str(out), "BTNS_VM_TIMEOUT": str(timeout)}
    start = time.monotonic()
    with console.open("wb") as log:
        try:
            rc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout + 60).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.monotonic() - start
    junit = out / "junit.xml"
    if not junit.exists():
        problem = f"the VM run produced no junit.xml (run.sh exit {rc}); console tail:\n{_tail(console)}"
        return VMRun({}, problem, out, seconds)
    problem = "" if rc in (0, 1) else f"run.sh exit {rc}; console tail:\n{_tail(console)}"
    return VMRun(parse_junit(junit), problem, out, seconds)
