"""The C examples on real CHILD_SAs: the strongSwan testbed of tests/integration.

The C programs run in peer A's network namespace (``ip netns exec``) and find
A's charon through ``$BTNS_VICI_SOCKET``; the server side is a Python socket in
B's namespace, whose pToken (read with the Python API) must mirror A's.

The fixture ``tb`` comes from btns-lab's pytest plugin (btns_lab.pytest_plugin), here
also under the name ``integration_tb``: the session's one host testbed.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btns_lab.testbed import Testbed
from btns_vici import AuthMethod, IToken, get_socket_ptoken
from btns_vici.core.derive import connection_binding
from btns_vici.core.records import Identity
from btns_vici.plugins import get_backend

from .conftest import C_DIR, EXAMPLES, Compiler, fields, run, run_env

pytestmark = pytest.mark.testbed

Server = tuple[int, list[socket.socket]]


@pytest.fixture
def integration_tb(tb: Testbed) -> Testbed:
    """The plugin's ``tb`` (the name this module's tests use, ``tb`` being their helpers' argument)."""
    return tb


@pytest.fixture
def b_server(integration_tb: Testbed) -> Iterator[Server]:
    tb = integration_tb
    """A TCP server on B's host address; yields (port, accepted connections)."""
    with tb.in_netns(tb.b):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((str(tb.b.v4), 0))
    srv.listen(8)
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()
    for conn in accepted:
        conn.close()


def in_a(tb: Testbed, exe: Path) -> list[str]:
    return ["ip", "netns", "exec", tb.a.netns, str(exe)]


def a_env(tb: Testbed) -> dict[str, str]:
    return {"BTNS_BACKEND": "strongswan", "BTNS_VICI_SOCKET": tb.a.vici_path}


def wait_for(accepted: list[socket.socket], timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted, "B accepted no connection"
    return accepted[-1]


def test_get_ptoken_example_across_the_testbed(
    integration_tb: Testbed, b_server: Server, compile_c: Compiler, tmp_path: Path
) -> None:
    tb = integration_tb
    tb.up("cabi", "rawkey", 4)
    port, accepted = b_server
    saved = tmp_path / "peer.itoken"
    proc = run(in_a(tb, compile_c(EXAMPLES / "get_ptoken.c")), str(tb.b.v4), str(port), str(saved), env=a_env(tb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["privacyProtected"] == "LEVEL_HIGH (5)"  # ChaCha20-Poly1305
    assert got["integrityProtected"] == "LEVEL_HIGH (5)"
    assert got["tunnelMode"] == "ENABLE (1)" and got["compressionAvailable"] == "DISABLE (0)"
    assert got["policyName"] == "cabi/host"
    assert "is protected by IPsec ESP" in got["informationString"]
    assert tb.a.key is not None and tb.b.key is not None
    b_der, a_der = tb.b.key.public_der, tb.a.key.public_der
    assert got["iToken.authenticationMethod"] == "BTNS (17)"
    assert got["iToken.pubKeyID"] == f"{len(b_der)} bytes {b_der.hex()}"
    assert got["iToken.channelBinding"] == connection_binding(
        Identity("", AuthMethod.BTNS, public_key=b_der), Identity("", AuthMethod.BTNS, public_key=a_der)
    )
    assert got["iToken.authMeth_BTNS"] == "ENABLE (1)"
    assert got["remote_iToken.pubKeyID"] == f"{len(a_der)} bytes {a_der.hex()}"
    assert got["saved"].startswith(f"{saved.stat().st_size} bytes")

    # B's view of the same connection, through the Python API, mirrors A's.
    conn = wait_for(accepted)
    pb = get_socket_ptoken(conn, get_backend("strongswan", tb.b.options))
    assert pb.protected and pb.remote_itoken is not None and pb.itoken is not None
    assert IToken.from_bytes(saved.read_bytes()) == pb.remote_itoken
    assert got["remote_iToken.channelBinding"] == pb.itoken.channel_binding

    # Example 2 reads the saved iToken back as an object.
    proc2 = run(compile_c(EXAMPLES / "itoken_attrs.c"), str(saved))
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    got2 = fields(proc2.stdout)
    assert got2["channelBinding"] == got["iToken.channelBinding"]
    assert got2["pubKeyID"] == got["iToken.pubKeyID"]


def test_set_socket_ptoken_example_across_the_testbed(
    integration_tb: Testbed, b_server: Server, compile_c: Compiler, tmp_path: Path
) -> None:
    tb = integration_tb
    tb.up("cabi3", "rawkey", 4)
    port, accepted = b_server
    exe = compile_c(EXAMPLES / "set_socket_ptoken.c")
    proc = run(in_a(tb, exe), str(tb.b.v4), str(port), "medium", env=a_env(tb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["ipsec_set_socket_pToken"] == "0"
    assert got["privacyProtected"] == "LEVEL_HIGH (5)"
    assert got["result"] == "protected as demanded"
    assert got["iToken.authenticationMethod"] == "BTNS (17)"
    wait_for(accepted)


@pytest.mark.parametrize("family", [4, 6])
def test_msg_functions_in_the_testbed(integration_tb: Testbed, compile_c: Compiler, family: int) -> None:
    """A datagram between two local sockets of A: no SA covers it, so the daemon says unprotected."""
    tb = integration_tb
    proc = run(in_a(tb, compile_c(C_DIR / "msg_udp.c")), str(tb.a.addr(family)), env=a_env(tb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["recvmsg"] == "5" and got["pktinfo"] == "1" and got["localport_ok"] == "1"
    assert got["get_msg_pToken"] == "0"
    assert got["privacyProtected"] == "0"  # IPSEC_API_ATTR_DISABLE: fail closed
    assert got["sendmsg_demand"] == f"-1 errno {errno.EACCES} Permission denied"
    assert got["received_after_demand"] == "-1"


@pytest.mark.parametrize("family", [4, 6])
def test_datagram_ptokens_across_the_testbed(integration_tb: Testbed, compile_c: Compiler, family: int) -> None:
    """A sends with a pToken (ipsec_sendmsg), B reads the datagram's pToken (ipsec_get_msg_pToken)."""
    tb = integration_tb
    assert tb.b.key is not None
    tb.up(f"cabimsg{family}", "rawkey", family)
    exe = compile_c(C_DIR / "msg_peer.c")
    port = str(24000 + family)
    b_env = {"BTNS_BACKEND": "strongswan", "BTNS_VICI_SOCKET": tb.b.vici_path}
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", tb.b.netns, str(exe), "recv", str(tb.b.addr(family)), port],
        env=run_env(b_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready: 1"
        # Privacy LEVEL_HIGH is demanded and met (ChaCha20-Poly1305): sent.
        sent = run(in_a(tb, exe), "send", str(tb.b.addr(family)), port, "5", env=a_env(tb))
        assert fields(sent.stdout)["sendmsg"] == "5", sent.stdout + sent.stderr
        out, err = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    got = fields(out)
    assert receiver.returncode == 0, out + err
    assert got["recvmsg"] == "5" and got["get_msg_pToken"] == "0"
    assert got["privacyProtected"] == "5"
    assert got["policyName"] == f"cabimsg{family}/host"
    # Towards B's plain address no SA covers the flow: refused before sending, fail closed.
    plain = run(in_a(tb, exe), "send", str(tb.b.addr(family, plain=True)), port, "3", env=a_env(tb))
    assert fields(plain.stdout)["sendmsg"] == f"-1 errno {errno.EACCES} Permission denied", plain.stdout
