"""The README's main job on the compose testbed, run as a user would (issue 7 item 2).

``python -m btns_lab.compose`` brings docker/docker-compose.yml up with podman
(charon only in each container, ``BTNS_CONN=no``), runs bob's server and alice's client
in the containers (set_socket_pToken demanding encryption and BTNS, library host keys,
peer keys from the shared volume), prints both ends' tokens and checks that they agree,
then takes the testbed down. The demo takes the compose lock itself, so this test must
not hold it. Needs root, podman and what scripts/compose/setup.sh installs; when any of
it is missing the test fails (never skips) and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compose

REPO = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("BTNS_COMPOSE_PROJECT", "btns-cmp")
DATAPLANE = os.environ.get("BTNS_DATAPLANE", "libipsec")
CACHE = os.environ.get("BTNS_COMPOSE_CACHE", "/var/cache/btns-compose")
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", f"{CACHE}/containers.conf")}
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.forwarding")
DEMO_TIMEOUT = 2400  # a cold image build, plus waiting for another run's compose lock


def _sysctls() -> dict[str, str]:
    return {name: Path("/proc/sys", *name.split(".")).read_text().strip() for name in SYSCTLS}


def _leftovers() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = []
    for argv in (["podman", "ps", "-aq"], ["podman", "volume", "ls", "-q"], ["podman", "network", "ls", "-q"]):
        res = subprocess.run([*argv, "--filter", label], capture_output=True, text=True, env=PODMAN_ENV, timeout=60)
        found += res.stdout.split()
    return found


def test_compose_demo_runs_and_both_ends_agree() -> None:
    if os.geteuid() != 0:
        pytest.fail("the compose demo needs root", pytrace=False)
    check = subprocess.run(
        [str(REPO / "scripts" / "compose" / "setup.sh"), "--check"], capture_output=True, text=True, timeout=120
    )
    if check.returncode != 0:
        pytest.fail(f"compose testbed prerequisites missing:\n{check.stderr}", pytrace=False)
    before = _sysctls()
    res = subprocess.run(
        [sys.executable, "-m", "btns_lab.compose", "--engine", "podman", "--dataplane", DATAPLANE],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        env=PODMAN_ENV,
    )
    out = res.stdout
    print(out[-400:])
    assert res.returncode == 0, out + res.stderr
    assert f"compose project {PROJECT} (podman)" in out and "no conn loaded" in out, out
    assert "A -> B: b'hello over IPsec'" in out and "B -> A: b'cesPI revo olleh'" in out, out
    assert out.count("[ok]") == 9 and "[FAIL]" not in out, out
    # Both ends' iTokens and remote_iTokens: four raw-key identities, BTNS, with channel bindings.
    assert out.count("authenticationMethod: BTNS") == 4, out
    assert len(re.findall(r"channelBinding: +btns-cb-v2:endpoints-sha256:[0-9a-f]{64}", out)) == 4, out
    # The SAs are the library's own (set_socket_pToken + connect/listen), not an operator conn.
    assert re.search(r"policyName: +btns-init-[0-9a-f]{12}/", out), out
    assert re.search(r"policyName: +btns-resp-[0-9a-f]{12}/", out), out
    mode = "tunnel" if DATAPLANE == "libipsec" else "transport"
    assert out.count(f"is protected by IPsec ESP in {mode} mode") == 2, out
    phases = ("up", "charons", "connection", "down", "total")
    assert re.search("timings: " + ", ".join(rf"{k} [0-9.]+ s" for k in phases), out), out
    assert _leftovers() == [], "the demo left the compose project behind"
    assert _sysctls() == before, "the demo left host sysctls changed"


def test_compose_demo_refuses_an_unknown_engine_clearly() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "btns_lab.compose"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**PODMAN_ENV, "BTNS_ENGINE": "lxd", "BTNS_DATAPLANE": DATAPLANE},
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "btns compose demo: unknown container engine 'lxd' (podman or docker)" in res.stderr, res.stderr
    assert res.stdout == "", res.stdout
