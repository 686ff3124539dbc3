"""The example backend of docs/backends.md (examples/backend_minimal), installed and driven.

It answers from a static SA table; the data-plane proof is the library's real one
(kernel-libipsec: where the kernel routes THIS socket's packets). The namespace here is
made for the test (``btns-kit-<pid>``): a TUN ``ipsec0`` that the test itself reads (what
charon's libipsec would encrypt), a route to the peer via ipsec0, and a veth with a
mark-selected route around it. The TUN and the veth are the packet captures: a pToken
that says "protected" must go with bytes on ipsec0 and none in clear, and the socket
whose mark sends it around must get "not protected", its bytes seen in clear.

Needs root (network namespaces); without it the fixture raises (an ERROR, never a skip).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import btns_vici
from btns_vici import api, dataplane, netns
from btns_vici.backend import Backend
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.errors import NotSupportedError, ProtocolError
from btns_vici.plugins import ENTRY_POINT_GROUP, get_backend
from btns_vici.protection import CONNECTION_REFUSAL, require
from btns_vici.sockets import view_of

from .wire import capture, seen

pytestmark = pytest.mark.testbed  # root and a network namespace of its own (no charon)

NS = f"btns-kit-{os.getpid()}"
LOCAL, PEER, CLEAR_NET = "10.77.0.1", "10.77.0.2", "10.77.1.1/24"
VETH, VETH_PEER = "btns-kv0", "btns-kv1"
BYPASS_MARK = 0x7
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000

TABLE = {
    "ike_sas": [
        {
            "name": "static-1",
            "local_host": LOCAL,
            "remote_host": PEER,
            "remote_id": "peer.example",
            "auth": "BTNS",
            "children": [
                {
                    "name": "static-1",
                    "spi_in": "c0000001",
                    "spi_out": "c0000002",
                    "encr_alg": "AES_GCM_16",
                    "encr_keysize": 256,
                    "local_ts": [f"{LOCAL}/32"],
                    "remote_ts": [f"{PEER}/32"],
                }
            ],
        }
    ]
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _in_ns(*args: str) -> None:
    subprocess.run(["ip", "netns", "exec", NS, *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(the SA table's path, the TUN fd the test reads ipsec0 from); the namespace is removed after."""
    if os.geteuid() != 0:
        raise RuntimeError("the example-backend test needs root (it creates a network namespace)")
    _ip("netns", "add", NS)
    tun = -1
    try:
        _in_ns("ip", "link", "set", "lo", "up")
        _in_ns("ip", "addr", "add", f"{LOCAL}/32", "dev", "lo")
        with netns.entered(NS):  # the TUN is made in the calling thread's namespace
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", dataplane.LIBIPSEC_DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        _in_ns("ip", "link", "set", dataplane.LIBIPSEC_DEVICE, "up")
        _in_ns("ip", "route", "add", f"{PEER}/32", "dev", dataplane.LIBIPSEC_DEVICE, "src", LOCAL)
        _in_ns("ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER)
        _in_ns("ip", "link", "set", VETH, "up")
        _in_ns("ip", "link", "set", VETH_PEER, "up")
        _in_ns("ip", "addr", "add", CLEAR_NET, "dev", VETH)
        _in_ns("ip", "rule", "add", "fwmark", hex(BYPASS_MARK), "table", "7")
        _in_ns("ip", "route", "add", f"{PEER}/32", "dev", VETH, "table", "7")
        # Nobody answers ARP on the veth: a static neighbour lets the datagram itself leave.
        _in_ns("ip", "neigh", "add", PEER, "lladdr", "02:00:00:00:00:02", "dev", VETH, "nud", "permanent")
        # Strict reverse-path filter: a clear packet "from the peer" on the veth is refused, so
        # what a protected socket receives can only come through ipsec0 (README "Inbound filter").
        _in_ns("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
        path = tmp_path_factory.mktemp("minimal") / "sas.json"
        path.write_text(json.dumps(TABLE))
        yield str(path), tun
    finally:
        if tun >= 0:
            os.close(tun)
        dataplane.forget(NS)
        subprocess.run(["ip", "netns", "del", NS], check=False, capture_output=True, timeout=10)


@pytest.fixture
def backend(lab: tuple[str, int]) -> Backend:
    return get_backend("minimal", {"sa_table": lab[0], "netns": NS, "dataplane": dataplane.LIBIPSEC})


def _drain(fd: int) -> list[bytes]:
    out = []
    while select.select([fd], [], [], 0.3)[0]:
        try:
            out.append(os.read(fd, 65535))
        except BlockingIOError:
            break
    return out


def _udp(mark: int = 0) -> socket.socket:
    with netns.entered(NS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.bind((LOCAL, 0))  # the SA's address: its flow is covered, whatever route the mark picks
    sock.connect((PEER, 9999))
    return sock


def test_the_example_is_installed_as_an_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names.get("minimal") == "btns_backend_minimal:plugin", (
        "examples/backend_minimal is not installed (scripts/setup.sh: pip install -e examples/backend_minimal)"
    )
    assert "minimal" in [b.name for b in btns_vici.backends()]


def test_it_lists_and_finds_the_table(backend: Backend) -> None:
    (ike,) = backend.list_sas()
    assert (ike.backend, ike.name, ike.remote.ike_id) == ("minimal", "static-1", "peer.example")
    flow = btns_vici.Flow(socket.IPPROTO_UDP, ike.local_host, 5000, ike.remote_host, 9999)
    found = backend.find_sa(flow)
    assert found is not None and found[1].spi_out == 0xC0000002
    assert backend.capabilities().dataplane == dataplane.LIBIPSEC
    assert backend.probe() is True


def test_protected_only_with_its_bytes_on_ipsec0(backend: Backend, lab: tuple[str, int]) -> None:
    tun = lab[1]
    _drain(tun)
    sock = _udp()
    try:
        tok = btns_vici.get_socket_ptoken(sock, backend)
        assert tok.protected, tok.information_string
        assert "via ipsec0" in (tok.information_string or "")
        marker = b"minimal-backend-protected-" + os.urandom(4).hex().encode()
        with capture(NS, VETH) as clear:
            sock.send(marker)
            into_ipsec0 = _drain(tun)
        assert any(marker in p for p in into_ipsec0), "the protected socket's datagram did not enter ipsec0"
        assert not seen(clear, marker), "the protected socket's datagram left in clear"
    finally:
        sock.close()


def test_hostile_a_mark_routes_around_ipsec0_and_the_token_says_so(backend: Backend, lab: tuple[str, int]) -> None:
    tun = lab[1]
    _drain(tun)
    sock = _udp(mark=BYPASS_MARK)
    try:
        tok = btns_vici.get_socket_ptoken(sock, backend)
        assert not tok.protected
        assert VETH in (tok.information_string or "") and "clear" in (tok.information_string or "")
        marker = b"minimal-backend-marked-" + os.urandom(4).hex().encode()
        with capture(NS, VETH) as clear:
            sock.send(marker)
            into_ipsec0 = _drain(tun)
        assert seen(clear, marker), "the marked socket's datagram was not seen in clear on the veth"
        assert not any(marker in p for p in into_ipsec0)
    finally:
        sock.close()


def test_hostile_a_socket_of_another_namespace_is_not_protected(backend: Backend) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the test's own namespace
    try:
        sock.connect(("127.0.0.1", 9999))
        tok = btns_vici.get_socket_ptoken(sock, backend)
        assert not tok.protected and "not in net:[" in (tok.information_string or "")
    finally:
        sock.close()


def test_what_it_does_not_implement_is_eopnotsupp(backend: Backend) -> None:
    sock = _udp()
    try:
        with pytest.raises(NotSupportedError) as err:
            backend.enforce(sock, btns_vici.PToken())
        assert err.value.errno == errno.EOPNOTSUPP
    finally:
        sock.close()


def test_a_malformed_table_is_eproto(tmp_path: Path, lab: tuple[str, int]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"ike_sas": [{"name": "x"}]}')
    be = get_backend("minimal", {"sa_table": str(bad), "netns": NS})
    with pytest.raises(ProtocolError) as err:
        be.list_sas()
    assert err.value.errno == errno.EPROTO and "local_host" in (err.value.strerror or "")


def test_the_watch_reports_a_changed_table(backend: Backend, lab: tuple[str, int]) -> None:
    import threading

    got = threading.Event()
    stop = backend.watch(lambda event: got.set() if event.kind == "reset" else None)
    try:
        st = os.stat(lab[0])
        os.utime(lab[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert got.wait(5), "no reset event after the table changed"
    finally:
        stop()


def _demand(method: AuthMethod) -> btns_vici.PToken:
    tok = btns_vici.PToken()
    it = btns_vici.IToken()
    it.set_auth_method(method, Setting.ENABLE)
    tok.itoken = it
    return tok


def test_an_unmet_demand_is_one_requirement_not_met_error(backend: Backend) -> None:
    sock = _udp()
    try:
        assert api.admit(sock, _demand(AuthMethod.BTNS), backend).protected  # met: the table's SA is BTNS
        with pytest.raises(btns_vici.RequirementNotMetError) as err:
            require(_demand(AuthMethod.PRESHAREDKEY), view_of(sock), backend)
        assert err.value.errno == errno.EACCES and isinstance(err.value, btns_vici.BtnsError)
        assert err.value.problems and str(err.value.strerror).startswith(CONNECTION_REFUSAL + ": ")
    finally:
        sock.close()
    marked = _udp(mark=BYPASS_MARK)
    try:
        with pytest.raises(btns_vici.RequirementNotMetError) as err:
            api.admit(marked, _demand(AuthMethod.BTNS), backend)
        assert any(p.startswith("why: ") and VETH in p for p in err.value.problems)
    finally:
        marked.close()


def test_hostile_on_kernel_xfrm_the_table_alone_proves_nothing(lab: tuple[str, int]) -> None:
    """The same SA on the kernel-xfrm data plane: the kernel holds no such state, so not protected."""
    be = get_backend("minimal", {"sa_table": lab[0], "netns": NS, "dataplane": dataplane.XFRM})
    sock = _udp()
    try:
        tok = btns_vici.get_socket_ptoken(sock, be)
        assert not tok.protected
        assert "the kernel SAD lacks the CHILD_SA's SAs (spi 0xc0000002 out" in (tok.information_string or "")
    finally:
        sock.close()
