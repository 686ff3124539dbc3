"""Host side of the libreswan VM tier: boots the VM once and runs guest_child_sas.py in it.

Marked ``vm`` and ``libreswan``. Each guest test's outcome is asserted here; a VM that does
not boot or report is a failure, never a skip. Needs scripts/vm/ (the VM tier) and root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.libreswan]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
GUEST_TESTS = (
    "test_every_conn_has_an_installed_child_sa",
    "test_spis_agree_between_the_two_plutos",
    "test_transport_raw_key_flow_is_protected_with_proof_and_ptoken",
    "test_null_auth_tunnel_flow",
    "test_traffic_is_counted",
    "test_unprotected_flow_and_terminated_sa_fail_closed",
    "test_set_socket_ptoken_null_auth_end_to_end",
)


@pytest.fixture(scope="module")
def guest_results() -> dict[str, str]:
    """{test name: "" if passed else the failure text} from one VM run."""
    if os.environ.get("BTNS_VM_GUEST") == "1":
        pytest.fail("test_lsw_vm.py is the host side; the guest runs guest_child_sas.py")
    run_sh = REPO / "scripts" / "vm" / "run.sh"
    if not os.access(run_sh, os.X_OK) or os.geteuid() != 0:
        pytest.fail(f"the VM tier needs root and {run_sh}", pytrace=False)
    out = Path(tempfile.mkdtemp(prefix="btns-lsw-vm-out-"))
    cmd = [
        str(run_sh),
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-o",
        "junit_logging=system-out",
        f"--junitxml={out}/junit.xml",
        str(HERE / "guest_child_sas.py"),
    ]
    env = {**os.environ, "BTNS_VM_OUT": str(out)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    junit = out / "junit.xml"
    if not junit.exists():
        shutil.rmtree(out, ignore_errors=True)
        pytest.fail(f"the VM produced no junit.xml (exit {proc.returncode}):\n{proc.stdout[-4000:]}", pytrace=False)
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [e for e in case if e.tag in ("failure", "error", "skipped")]
        results[case.get("name", "")] = "\n".join(f"{e.get('message', '')}\n{e.text or ''}" for e in bad)
    if not os.environ.get("BTNS_VM_KEEP"):
        shutil.rmtree(out, ignore_errors=True)
    return results


@pytest.mark.parametrize("name", GUEST_TESTS)
def test_in_vm(guest_results: dict[str, str], name: str) -> None:
    assert name in guest_results, f"{name} did not report from the VM: {sorted(guest_results)}"
    assert guest_results[name] == "", f"{name} failed in the VM:\n{guest_results[name]}"
