"""The host side of the VM tier: boot the VM once, run pytest in it, read its junit.xml back.

Used by tests/vm/conftest.py; pure helpers (junit_key, parse_junit) are unit-tested on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
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


_SILENT = -1


def _boot_and_run(
    cmd: list[str], root: Path, env: dict[str, str], console: Path, timeout: int, first_output: float
) -> int:
    """run.sh's exit status; _SILENT when the guest printed nothing within ``first_output`` seconds."""
    with console.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        began = time.monotonic()
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - began
            silent = console.stat().st_size == 0
            if (silent and elapsed > first_output) or elapsed > timeout + 60:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return _SILENT if silent else 124


def run_in_vm(root: Path, nodeids: list[str]) -> VMRun:
    """Boot the VM once and run ``pytest -m vm`` on ``nodeids`` (relative to ``root``) there."""
    out = Path(tempfile.mkdtemp(prefix="btns-vm-out-"))
    console = out / "console.log"
    timeout = int(os.environ.get("BTNS_VM_TIMEOUT", "540"))
    cmd = [
        str(root / "scripts/vm/run.sh"),
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-m",
        "vm",
        "-o",
        "junit_logging=system-out",
        f"--junitxml={out}/junit.xml",
        "-q",
        "-rA",
        *nodeids,
    ]
    env = {**os.environ, "BTNS_VM_OUT": str(out), "BTNS_VM_TIMEOUT": str(timeout)}
    first_output = float(os.environ.get("BTNS_VM_FIRST_OUTPUT", "180"))
    start = time.monotonic()
    for attempt in (1, 2):
        rc = _boot_and_run(cmd, root, env, console, timeout, first_output)
        if rc != _SILENT:
            break
        # The guest printed nothing at all (a TCG boot that hung before pytest started, seen once
        # in ~40 runs): boot it once more rather than fail every test; the console says so.
        with console.open("ab") as log:
            log.write(
                f"\nvmtier: no output from the guest within {first_output:.0f} s (attempt {attempt}); "
                "booting again\n".encode()
            )
    if rc == _SILENT:
        rc = 124
    seconds = time.monotonic() - start
    junit = out / "junit.xml"
    if not junit.exists():
        problem = f"the VM run produced no junit.xml (run.sh exit {rc}); console tail:\n{_tail(console)}"
        return VMRun({}, problem, out, seconds)
    problem = "" if rc in (0, 1) else f"run.sh exit {rc}; console tail:\n{_tail(console)}"
    return VMRun(parse_junit(junit), problem, out, seconds)
