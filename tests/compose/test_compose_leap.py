"""Leap of faith across two compose containers (issue 17, item 5): btnsd --leap-of-faith end to end.

docker/docker-compose.yml with ``BTNS_CONN=no BTNS_LEAP=yes``: each container runs charon and
``btnsd --leap-of-faith`` and nothing else; no key, certificate or secret is exchanged through the
shared volume or anywhere else. The programs run as ``nobody`` and reach IPsec only through btnsd
(set_socket_pToken / connect / listen / accept / get_socket_pToken over the broker socket): the
daemon learns the peer's key for them at first contact. Checked: first contact BTNS on both ends,
the second LEAPOFFAITH on both ends (meeting a LEAPOFFAITH-only demand), bob's key swapped (a new
host key after a restart) refused for a LEAPOFFAITH demand and reported BTNS for a BTNS demand,
and the learning port flooded from another address while a real connection still works.

Needs root, podman and what scripts/compose/setup.sh installs (fails, never skips, without).
"""

from __future__ import annotations

import base64
import json
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_compose import (
    PEERS,
    PODMAN_ENV,
    PROJECT,
    SCRIPTS,
    UP_TIMEOUT,
    ComposeTestbed,
    _check_prerequisites,
    _project_leftovers,
    _read_sysctls,
    _run,
    compose_lock,  # noqa: F401  (the fixture: one compose testbed per host at a time)
)

pytestmark = pytest.mark.compose

DATAPLANE = "libipsec"  # this kernel has no ESP; kernel-libipsec in both containers
FLOOD_SRC = "172.31.250.20"  # a second address on alice's link: the flood's source, not alice's
FLOODER = Path(__file__).resolve().parents[1] / "integration" / "leap_flooder.py"
KNOWN_PEERS = "/var/lib/btns-vici/known_peers.json"  # btnsd's store (root's), in each container

COMMON = """
import errno, json, socket, sys
import btns_vici
from btns_vici import AuthMethod, IToken, PToken, Setting
from btns_vici.api import accept, connect, listen

def demand(methods):
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.integrity_protected = Setting.ENABLE
    t = IToken()
    for m in methods.split(","):
        t.set_auth_method(AuthMethod[m], Setting.ENABLE)
    p.itoken = t
    return p

def describe(p):
    it = p.itoken
    return {"protected": p.protected, "method": it.authentication_method.name if it else None,
            "peer_key": it.pub_key_id.hex() if it and it.pub_key_id else None, "info": p.information_string}
"""

SERVER = (
    COMMON
    + """
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
btns_vici.set_socket_ptoken(srv, demand(sys.argv[3]))
srv.bind((sys.argv[1], int(sys.argv[2])))
listen(srv, 4)
srv.settimeout(40)
print("listening", flush=True)
conn, _ = accept(srv)
conn.settimeout(30)
data = conn.recv(64)
# before answering: once alice has her answer she exits, and her btnsd then unloads the
# connection it made for her (the SA goes down, and this socket's latch breaks)
result = describe(btns_vici.get_socket_ptoken(conn))
conn.sendall(data[::-1])
conn.recv(1)
print(json.dumps(result), flush=True)
"""
)

CLIENT = (
    COMMON
    + """
import os
c = socket.socket()
c.settimeout(30)
btns_vici.set_socket_ptoken(c, demand(sys.argv[3]))
try:
    connect(c, (sys.argv[1], int(sys.argv[2])))
except OSError as exc:
    print(json.dumps({"errno": errno.errorcode.get(exc.errno, exc.errno), "error": exc.strerror}), flush=True)
    sys.exit(0)
c.sendall(b"leap-compose")
echo = c.recv(64)
result = describe(btns_vici.get_socket_ptoken(c))
result.update(echo=echo.decode(), uid=os.getuid())
c.close()
print(json.dumps(result), flush=True)
"""
)

HOST_KEY = """
from btns_vici.hostkey import load_or_create
print(load_or_create(None).public_der.hex())
"""


def _argv(tb: ComposeTestbed, service: str, *argv: str, user: str = "root") -> list[str]:
    """``podman exec`` of ``argv`` in the service's container as ``user``."""
    return ["podman", "exec", "-u", user, tb.container(service), *argv]


def _wait_btnsd(tb: ComposeTestbed, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for service in PEERS:
        while True:
            probe = _run(["podman", "exec", tb.container(service), "test", "-S", "/run/btns-vici/btnsd.sock"], 30)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                logs = _run(["podman", "logs", "--tail", "30", tb.container(service)], 30)
                pytest.fail(f"btnsd did not start in {service}:\n{logs.stdout}{logs.stderr}", pytrace=False)
            time.sleep(0.3)


@pytest.fixture(scope="module")
def leap_tb(compose_lock: None) -> Iterator[ComposeTestbed]:  # noqa: F811
    _check_prerequisites()
    env = {
        **PODMAN_ENV,
        "BTNS_DATAPLANE": DATAPLANE,
        "BTNS_AUTH": "pubkey",
        "BTNS_CONN": "no",
        "BTNS_LEAP": "yes",
        "BTNS_COMPOSE_PROJECT": PROJECT,
    }
    if any(_project_leftovers().values()):
        _run([str(SCRIPTS / "down.sh")], timeout=300, env=env)
    sysctls_before = _read_sysctls()
    tb = ComposeTestbed(auth="leap", dataplane=DATAPLANE, env=env)
    t0 = time.monotonic()
    up = _run([str(SCRIPTS / "up.sh")], timeout=UP_TIMEOUT, env=env)
    try:
        if up.returncode != 0:
            pytest.fail(f"scripts/compose/up.sh failed (leap):\n{up.stdout}\n{up.stderr}", pytrace=False)
        _wait_btnsd(tb)
        tb.timings["up"] = time.monotonic() - t0
        yield tb
    finally:
        down = _run([str(SCRIPTS / "down.sh")], timeout=300, env=env)
        sysctls_after = _read_sysctls()
        for name, value in sysctls_before.items():
            if sysctls_after[name] != value:
                Path("/proc/sys", *name.split(".")).write_text(value)
    assert down.returncode == 0, f"scripts/compose/down.sh failed:\n{down.stdout}\n{down.stderr}"
    assert sysctls_after == sysctls_before, "the testbed left host sysctls changed (now restored)"
    assert not any(_project_leftovers().values()), f"project {PROJECT} left behind"


def contact(tb: ComposeTestbed, port: int, client_wants: str, server_wants: str) -> dict[str, dict]:
    """bob (nobody) listens with ``server_wants``, alice (nobody) connects with ``client_wants``."""
    server = subprocess.Popen(
        _argv(tb, "bob", "python", "-c", SERVER, PEERS["bob"], str(port), server_wants, user="nobody"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=PODMAN_ENV,
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 30)
        assert ready and server.stdout.readline().strip() == "listening", "bob's server did not start"
        t0 = time.monotonic()
        run = _run(
            _argv(tb, "alice", "python", "-c", CLIENT, PEERS["bob"], str(port), client_wants, user="nobody"),
            timeout=90,
        )
        assert run.returncode == 0, f"alice's client failed:\n{run.stdout}\n{run.stderr}"
        out = run.stdout
        took = time.monotonic() - t0
        client = json.loads(out.strip().splitlines()[-1])
        client["took"] = took
        if "errno" in client:
            server.kill()
            server.wait()
            return {"alice": client, "bob": {}}
        sout, serr = server.communicate(timeout=60)
        assert server.returncode == 0, f"bob's server failed:\n{sout}\n{serr}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"alice": client, "bob": json.loads(sout.strip().splitlines()[-1])}


def host_key(tb: ComposeTestbed, service: str) -> str:
    return tb.exec(service, "python", "-c", HOST_KEY).strip().splitlines()[-1]


def store(tb: ComposeTestbed, service: str) -> dict:
    return json.loads(tb.exec(service, "cat", KNOWN_PEERS))["peers"]


def test_first_contact_btns_second_leap_of_faith(leap_tb: ComposeTestbed) -> None:
    for service in PEERS:  # nothing configured: no peer key anywhere, no conn
        assert "public key" not in leap_tb.exec(service, "swanctl", "--list-conns")
        assert _run(["podman", "exec", leap_tb.container(service), "test", "-e", KNOWN_PEERS], 30).returncode != 0
    first = contact(leap_tb, 7301, "BTNS,LEAPOFFAITH", "BTNS,LEAPOFFAITH")
    a, b = first["alice"], first["bob"]
    print(f"compose leap: first contact took {a['took'] * 1000:.0f} ms (podman exec included)")
    assert a.get("echo") == "leap-compose"[::-1] and a["uid"] != 0, a
    assert a["protected"] and b["protected"], first
    assert a["method"] == "BTNS" and b["method"] == "BTNS", first
    key_a, key_b = host_key(leap_tb, "alice"), host_key(leap_tb, "bob")
    assert a["peer_key"] == key_b and b["peer_key"] == key_a, first
    sa, sb = store(leap_tb, "alice"), store(leap_tb, "bob")
    assert sa[PEERS["bob"]]["how"] == "leap-initiator" and sb[PEERS["alice"]]["how"] == "leap-responder"
    second = contact(leap_tb, 7302, "LEAPOFFAITH", "LEAPOFFAITH")
    assert second["alice"]["method"] == "LEAPOFFAITH", second
    assert second["bob"]["method"] == "LEAPOFFAITH", second
    assert "leap of faith" in second["alice"]["info"], second


def test_learning_port_flooded_real_connections_work(leap_tb: ComposeTestbed) -> None:
    leap_tb.exec("alice", "ip", "addr", "add", f"{FLOOD_SRC}/24", "dev", "eth0")
    flood = subprocess.Popen(
        _argv(leap_tb, "alice", "python", "-c", FLOODER.read_text(), FLOOD_SRC, PEERS["bob"], "5386", "5", "20000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=PODMAN_ENV,
    )
    try:
        time.sleep(1.0)
        during = contact(leap_tb, 7311, "BTNS,LEAPOFFAITH", "BTNS,LEAPOFFAITH")
        out, err = flood.communicate(timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        leap_tb.exec("alice", "ip", "addr", "del", f"{FLOOD_SRC}/24", "dev", "eth0")
    sent = int(out.strip() or 0)
    print(f"compose leap: {sent} datagrams flooded; a real connection took {during['alice']['took'] * 1000:.0f} ms")
    assert sent > 10000, err
    assert during["alice"]["protected"] and during["bob"]["protected"], during
    assert during["alice"].get("echo") == "leap-compose"[::-1], during
    assert set(store(leap_tb, "bob")) == {PEERS["alice"]}, "the flood left state in bob's store"
    assert "btnsd exited" not in _run(["podman", "logs", leap_tb.container("bob")], 30).stderr


# --- last: it gives bob a new host key ---------------------------------------------------------------


def test_key_swapped_on_the_peer_refused_for_lof_reported_for_btns(leap_tb: ComposeTestbed) -> None:
    old = host_key(leap_tb, "bob")
    leap_tb.exec("bob", "sh", "-c", "rm -f /var/lib/btns-vici/host.key*")  # bob "reinstalled"
    restart = _run(["podman", "restart", "-t", "5", leap_tb.container("bob")], timeout=60)
    assert restart.returncode == 0, restart.stderr
    _wait_btnsd(leap_tb)
    new = host_key(leap_tb, "bob")
    assert new != old
    # bob's new interface has a new MAC and sends alice nothing that would update hers (as the
    # entrypoint does for the operator conn); without this the exchange may time out first.
    leap_tb.exec("alice", "ip", "neigh", "flush", "to", PEERS["bob"])
    time.sleep(10.5)  # past alice's btnsd cache of a recent exchange (leap.RECENT_TTL)
    refused = contact(leap_tb, 7321, "LEAPOFFAITH", "BTNS,LEAPOFFAITH")["alice"]
    assert refused.get("errno") == "EACCES" and "different key" in refused["error"], refused
    btns = contact(leap_tb, 7322, "BTNS,LEAPOFFAITH", "BTNS,LEAPOFFAITH")
    assert btns["alice"]["method"] == "BTNS" and btns["alice"]["peer_key"] == new, btns
    entry = store(leap_tb, "alice")[PEERS["bob"]]
    assert entry["fingerprint"] and entry["changes"], entry  # the new key recorded aside
    assert base64.b64decode(entry["key"]).hex() == old, "a changed key never replaces the stored one"
    logs = _run(["podman", "logs", leap_tb.container("alice")], 30)
    assert "KEY CHANGED" in logs.stdout + logs.stderr
