"""The daemon edge against a fake charon that misbehaves: every answer bounded in time and
memory, every failure its own errno (issue 13).

Each test runs a real AF_UNIX VICI server in a thread (tests/unit/fake_vici.py).
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from btns_vici.core import errors
from btns_vici.core.errors import (
    BackendError,
    DaemonDownError,
    DaemonTimeoutError,
    ProtocolError,
)
from btns_vici.core.selectors import Flow
from btns_vici.plugins import get_backend
from btns_vici.strongswan import coverage
from btns_vici.strongswan import session as vs
from btns_vici.strongswan.events import EventStream
from btns_vici.strongswan.index import SAIndex
from btns_vici.strongswan.session import ViciSession, decode_bytes

from .fake_vici import CMD_RESPONSE, FakeVici, event, packet, read_request, response, scripted

DATA = Path(__file__).parent.parent / "data" / "vici"
FLOW = Flow(socket.IPPROTO_TCP, ipaddress.ip_address("10.231.0.1"), 20000, ipaddress.ip_address("10.231.0.2"), 80)
DEADLINE = 1.0


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "charon.vici")


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        fn(*args, **kwargs)
    return exc.value, time.monotonic() - t0


# -- time: the deadline covers the whole operation ------------------------------------------------


def trickle(conn: socket.socket) -> None:
    """Read the request, then send a valid 60-byte reply one byte a second."""
    read_request(conn)
    raw = response({"daemon": "charon", "version": "5.9.8", "sysname": "Linux", "release": "6.1"})
    for b in raw:
        conn.sendall(bytes([b]))
        time.sleep(0.2 if b == raw[0] else 1.0)


def silence(conn: socket.socket) -> None:
    read_request(conn)
    time.sleep(30)


@pytest.mark.parametrize("handler", [trickle, silence], ids=["trickle", "silence"])
def test_deadline_bounds_the_whole_request(sock_path, handler):
    with FakeVici(sock_path, handler):
        err, took = timed(ViciSession(sock_path, timeout=DEADLINE).request, "version")
    assert isinstance(err, DaemonTimeoutError) and isinstance(err, TimeoutError)
    assert err.errno == errno.ETIMEDOUT
    assert sock_path in str(err)
    assert DEADLINE * 0.9 <= took < DEADLINE + 0.5


@pytest.mark.parametrize("handler", [trickle, silence], ids=["trickle", "silence"])
def test_deadline_bounds_a_query_through_the_backend(sock_path, handler):
    """get_backend(...).find_sa on a trickling/silent daemon: ETIMEDOUT within the option's deadline."""
    with FakeVici(sock_path, handler):
        be = get_backend("strongswan", {"vici_socket": sock_path, "timeout": str(DEADLINE)})
        err, took = timed(be.find_sa, FLOW)
    assert err.errno == errno.ETIMEDOUT
    assert took < DEADLINE + 0.5


def test_timeout_from_the_environment(sock_path, monkeypatch):
    monkeypatch.setenv("BTNS_VICI_TIMEOUT", "0.3")
    assert vs.timeouts({}) == (0.3, 0.3 * vs.LIST_FACTOR, 0.3)
    assert vs.timeouts({"timeout": "2", "list_timeout": "7", "probe_timeout": "0.5"}) == (2.0, 7.0, 0.5)
    monkeypatch.setenv("BTNS_VICI_TIMEOUT", "soon")
    with pytest.raises(OSError) as exc:
        vs.timeouts({})
    assert exc.value.errno == errno.EINVAL and "BTNS_VICI_TIMEOUT" in str(exc.value)


def test_event_barrier_has_a_deadline(sock_path):
    def handler(conn):
        for _ in range(4):
            read_request(conn)
            conn.sendall(packet(5))
        silence(conn)

    with FakeVici(sock_path, handler):
        stream = EventStream(sock_path, timeout=DEADLINE)
        try:
            err, took = timed(stream.barrier)
        finally:
            stream.close()
    assert err.errno == errno.ETIMEDOUT and took < DEADLINE + 0.5


# -- no daemon, and a daemon we may not talk to --------------------------------------------------------


def test_no_daemon_is_econnrefused(tmp_path):
    missing = str(tmp_path / "none.vici")
    err, took = timed(ViciSession(missing).request, "version")
    assert isinstance(err, DaemonDownError) and err.errno == errno.ECONNREFUSED and took < 0.5
    # a socket file nobody listens on
    path = str(tmp_path / "dead.vici")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    err, _ = timed(ViciSession(path).request, "version")
    assert isinstance(err, DaemonDownError) and err.errno == errno.ECONNREFUSED


def test_probe_is_false_only_when_nobody_is_there(tmp_path, sock_path):
    assert get_backend("strongswan", {"vici_socket": str(tmp_path / "none")}).probe() is False
    with FakeVici(sock_path, silence):
        be = get_backend("strongswan", {"vici_socket": sock_path, "probe_timeout": "0.3"})
        err, took = timed(be.probe)
    assert err.errno == errno.ETIMEDOUT and took < 0.8


def test_default_selection_probes_in_parallel_and_reports_the_most_specific_failure(sock_path, monkeypatch):
    monkeypatch.delenv("BTNS_BACKEND", raising=False)
    with FakeVici(sock_path, silence):
        t0 = time.monotonic()
        with pytest.raises(BackendError) as exc:
            get_backend(None, {"vici_socket": sock_path, "pluto_ctl": "/nonexistent/pluto.ctl"})
        took = time.monotonic() - t0
    assert exc.value.errno == errno.ETIMEDOUT, exc.value
    assert "strongswan" in str(exc.value)
    assert took < vs.PROBE_TIMEOUT + 1.0


def test_specificity_order():
    order = [
        errors.BackendError("x"),
        errors.DaemonDownError("x"),
        errors.DaemonTimeoutError("x"),
        errors.ProtocolError("x"),
        errors.DaemonAccessError("x"),
    ]
    ranks = [errors.specificity(e) for e in order]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_access_message_names_path_and_access(tmp_path):
    d = tmp_path / "priv"
    d.mkdir()
    path = d / "charon.vici"
    assert "write (w) permission on the socket" in vs.access_problem(str(path))


UNPRIVILEGED = """
import errno, sys, time
sys.path.insert(0, sys.argv[1])
from btns_vici.strongswan.session import ViciSession
t0 = time.monotonic()
try:
    ViciSession(sys.argv[2], timeout=2).request("version")
except OSError as exc:
    print(type(exc).__name__, exc.errno, round(time.monotonic() - t0, 3), exc.strerror, sep="|")
"""


def _unprivileged_tree(tmp_path: Path) -> Path:
    """btns_vici.core.errors + strongswan.session and the vici codec, importable by nobody."""
    import vici

    root = tmp_path / "lib"
    pkg = root / "btns_vici"
    (pkg / "strongswan").mkdir(parents=True)
    (pkg / "core").mkdir()
    src = Path(vs.__file__).parent.parent
    (pkg / "__init__.py").write_text("")
    (pkg / "strongswan" / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    shutil.copy(src / "core" / "errors.py", pkg / "core" / "errors.py")
    shutil.copy(src / "strongswan" / "session.py", pkg / "strongswan" / "session.py")
    shutil.copy(src / "forksafe.py", pkg / "forksafe.py")
    shutil.copytree(Path(vici.__file__).parent, root / "vici")
    (root / "probe.py").write_text(UNPRIVILEGED)
    for p in [tmp_path, *tmp_path.parents]:
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)  # others may traverse to the copy
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return root


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser") or not os.path.exists("/usr/bin/python3"),
    reason="needs root to run a probe as nobody",
)
@pytest.mark.parametrize("where", ["socket", "directory"])
def test_socket_we_may_not_open_is_eacces(tmp_path, where):
    """As nobody: a 0700 directory or a 0600 socket -> EACCES naming the path and the access needed."""
    root = _unprivileged_tree(tmp_path)
    d = tmp_path / "run"
    d.mkdir()
    path = str(d / "charon.vici")
    with FakeVici(path, scripted(lambda _c: [])):
        if where == "socket":
            os.chmod(d, 0o755)
            os.chmod(path, 0o600)
        else:
            os.chmod(d, 0o700)
        out = subprocess.run(
            ["runuser", "-u", "nobody", "--", "/usr/bin/python3", str(root / "probe.py"), str(root), path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    name, code, took, msg = out.stdout.strip().split("|", 3)
    assert name == "DaemonAccessError" and int(code) == errno.EACCES, out.stdout
    assert path in msg
    want = "write (w) permission on the socket" if where == "socket" else f"search (x) permission on directory {d}"
    assert want in msg, msg
    assert float(took) < 1.0


# -- memory: nothing over charon's limit, bounded decoding -----------------------------------------------


def huge(conn: socket.socket) -> None:
    """Announce a 16 MiB reply and send it (a nested-sections bomb)."""
    read_request(conn)
    n = 16 << 20
    conn.sendall(struct.pack("!I", n) + bytes([CMD_RESPONSE]))
    chunk = b"\x01\x01a" * (1 << 16)
    sent = 1
    while sent < n:
        conn.sendall(chunk)
        sent += len(chunk)


def _bounded(fn, limit: int):
    """(error, seconds) of ``fn``, asserting its peak Python allocation below ``limit``.

    Timed without tracemalloc (it slows allocation-heavy code tenfold), measured with it."""
    err, took = timed(fn)
    tracemalloc.start()
    try:
        timed(fn)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"
    return err, took


def test_huge_reply_refused_unread(sock_path):
    with FakeVici(sock_path, huge):
        err, took = _bounded(lambda: ViciSession(sock_path, timeout=5).request("version"), 1 << 20)
    assert isinstance(err, ProtocolError) and err.errno == errno.EPROTO
    assert "16777216" in str(err) and "524288" in str(err)
    assert took < 0.5


def _reply_of(body: bytes):
    def handler(conn):
        read_request(conn)
        payload = bytes([CMD_RESPONSE]) + body
        conn.sendall(struct.pack("!I", len(payload)) + payload)
        time.sleep(2)

    return handler


DEEP = b"\x01\x01a" * (vs.MAX_PACKET // 3 - 10)
ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def _name(i: int) -> bytes:
    return bytes([ALPHABET[i % 64], ALPHABET[i // 64 % 64], ALPHABET[i // 4096 % 64]])


FLAT = b"\x04\x01l" + b"\x05\x00\x00" * (vs.MAX_PACKET // 3 - 10) + b"\x06"


@pytest.mark.parametrize("body", [DEEP, FLAT], ids=["deep", "list-items"])
def test_bomb_within_the_limit_is_refused_with_bounded_memory(sock_path, body):
    with FakeVici(sock_path, _reply_of(body)):
        err, took = _bounded(lambda: ViciSession(sock_path, timeout=5).request("version"), 12 << 20)
    assert isinstance(err, ProtocolError) and err.errno == errno.EPROTO
    assert "malformed VICI message" in str(err)
    assert took < 2.0


def test_largest_acceptable_message_costs_a_few_mb():
    """The worst message the decoder accepts (as many tiny distinct keys as 512 KiB hold) stays below ~12 MB."""
    n = min(vs.MAX_ELEMENTS - 1, vs.MAX_PACKET // 7 - 1)
    body = b"".join(b"\x03\x03" + _name(i) + b"\x00\x00" for i in range(n))
    tracemalloc.start()
    try:
        msg = vs.decode_message(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(msg) == n
    assert peak < 12 << 20, peak


@pytest.mark.parametrize(
    "raw",
    [b"\xff" * 40, b"\x09\x00", os.urandom(64), b"\x01\x01\x03abc\x00\x10ab", b"\x01\x01\x01a\x01\x01b"],
    ids=["ff", "type9", "random", "truncated-value", "unterminated"],
)
def test_garbage_is_eproto(sock_path, raw):
    payload = raw

    def handler(conn):
        read_request(conn)
        conn.sendall(struct.pack("!I", len(payload)) + payload)
        time.sleep(1)

    with FakeVici(sock_path, handler):
        err, took = timed(ViciSession(sock_path, timeout=2).request, "version")
    assert isinstance(err, ProtocolError), err
    assert err.errno == errno.EPROTO and took < 0.5


def test_close_mid_reply_is_eproto(sock_path):
    def handler(conn):
        read_request(conn)
        conn.sendall(struct.pack("!I", 100) + b"\x01\x03\x07version")
        conn.close()

    with FakeVici(sock_path, handler):
        err, took = timed(ViciSession(sock_path, timeout=2).request, "version")
    assert isinstance(err, ProtocolError) and err.errno == errno.EPROTO
    assert "truncated" in str(err) and took < 0.5


def test_zero_length_packet_is_eproto(sock_path):
    def handler(conn):
        read_request(conn)
        conn.sendall(struct.pack("!I", 0))
        time.sleep(1)

    with FakeVici(sock_path, handler):
        err, _ = timed(ViciSession(sock_path, timeout=2).request, "version")
    assert err.errno == errno.EPROTO


# -- wrong types from the daemon: EPROTO, never ValueError/KeyError ----------------------------------------


def _listed() -> dict:
    return decode_bytes((DATA / "list-sas-ports.vici").read_bytes())


def _mutations() -> list[tuple[str, dict]]:
    out = []
    base = _listed()
    ike = next(iter(base))
    child = next(iter(base[ike]["child-sas"]))

    def mut(name, fn):
        m = copy.deepcopy(base)
        fn(m[ike])
        out.append((name, m))

    mut("ike-uniqueid-abc", lambda s: s.__setitem__("uniqueid", b"abc"))
    mut("child-uniqueid-abc", lambda s: s["child-sas"][child].__setitem__("uniqueid", b"abc"))
    mut("child-sas-scalar", lambda s: s.__setitem__("child-sas", b"none"))
    mut("child-entry-scalar", lambda s: s["child-sas"].__setitem__(child, b"x"))
    mut("ts-scalar", lambda s: s["child-sas"][child].__setitem__("remote-ts", b"10.0.0.1/32"))
    mut("ts-garbage", lambda s: s["child-sas"][child].__setitem__("remote-ts", [b"10.0.0.300/32[tcp]"]))
    mut("spi-not-hex", lambda s: s["child-sas"][child].__setitem__("spi-in", b"zz"))
    mut("name-section", lambda s: s["child-sas"][child].__setitem__("name", {"a": b"b"}))
    mut("state-list", lambda s: s.__setitem__("state", [b"ESTABLISHED"]))
    mut("host-not-address", lambda s: s.__setitem__("remote-host", b"example"))
    mut("no-uniqueid", lambda s: s.pop("uniqueid"))
    mut("not-utf8", lambda s: s.__setitem__("remote-id", b"\xff\xfe"))
    return out


@pytest.mark.parametrize(("name", "msg"), _mutations(), ids=[n for n, _ in _mutations()])
def test_wrong_types_are_eproto(sock_path, name, msg):
    """A well-framed list-sas with a value of the wrong type: the index and the listing raise EPROTO."""
    raw = event("list-sa", msg)

    def listing(command):
        return [raw] if command == "list-sas" else []

    with FakeVici(sock_path, scripted(listing)):
        index = SAIndex(sock_path, ViciSession(sock_path, timeout=2), timeout=2)
        try:
            with pytest.raises(ProtocolError) as exc:
                index.find(FLOW)
                index.snapshot()
        finally:
            index.close()
        assert exc.value.errno == errno.EPROTO
        be = get_backend("strongswan", {"vici_socket": sock_path, "timeout": "2", "index": "list"})
        with pytest.raises(ProtocolError):
            be.list_sas()


@pytest.mark.parametrize("bad", [b"\xff", {"x": b"1"}, b"maybe"], ids=["bytes", "section", "word"])
def test_command_failure_and_bad_success_value(sock_path, bad):
    replies = {"load-conn": response({"success": bad, "errmsg": "nope"})}
    with FakeVici(sock_path, scripted(lambda _c: [], replies)):
        with pytest.raises(ProtocolError):
            ViciSession(sock_path, timeout=2).request("load-conn", {"x": {}})
    replies = {"load-conn": response({"success": "no", "errmsg": "nope"})}
    with FakeVici(sock_path + "2", scripted(lambda _c: [], replies)):
        with pytest.raises(errors.CommandFailedError) as exc:
            ViciSession(sock_path + "2", timeout=2).request("load-conn", {"x": {}})
    assert exc.value.errno == errno.EIO and "nope" in str(exc.value)


def test_event_stream_refuses_oversized_event(sock_path):
    def handler(conn):
        for _ in range(4):
            read_request(conn)
            conn.sendall(packet(5))
        conn.sendall(struct.pack("!I", 1 << 30))
        time.sleep(2)

    with FakeVici(sock_path, handler):
        stream = EventStream(sock_path, timeout=2)
        try:
            deadline = time.monotonic() + 2
            with pytest.raises(ProtocolError):
                while time.monotonic() < deadline:
                    stream.poll(0.1)
        finally:
            stream.close()


# -- lifecycle (item 5): owner records, liveness, stale sweep, charon's key ids ----------------


def test_charon_key_id_is_the_sha1_of_the_subject_public_key():
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from btns_vici.strongswan.keys import key_id

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(der) == hashlib.sha1(raw).hexdigest()
    for bad in (b"", b"\x30", b"\x02\x01\x00", der[:-1], b"\x30\x03\x30\x01\x00"):
        with pytest.raises(ValueError):
            key_id(bad)


def test_lifecycle_liveness_and_hostile_records(tmp_path, monkeypatch):
    import sys

    from btns_vici import lifecycle

    state = tmp_path / "owned"
    state.mkdir()
    monkeypatch.setenv("BTNS_STATE_DIR", str(state))
    me = lifecycle.start_time(os.getpid())
    assert me is not None and lifecycle.alive(os.getpid(), me) and not lifecycle.alive(os.getpid(), me + 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert lifecycle.start_time(dead.pid) is None
    boot = lifecycle._boot_id()
    pidns = lifecycle._pidns()
    base = {"boot": boot, "pidns": pidns}
    records = {
        "dead.json": {**base, "pid": dead.pid, "start": 1, "loaded": [{"backend": "no-such", "name": "btns-init-x"}]},
        "me.json": {**base, "pid": os.getpid(), "start": me, "loaded": []},
        "otherns.json": {**base, "pidns": pidns + 1, "pid": dead.pid, "start": 1, "loaded": []},
        "garbage.json": "not an object",
        "types.json": {**base, "pid": "1", "start": None, "loaded": [{"backend": 3}, None, "x"]},
    }
    for name, body in records.items():
        (state / name).write_text(json.dumps(body))
    (state / "broken.json").write_text("{")
    assert lifecycle._record_alive(records["me.json"]) is True
    assert lifecycle._record_alive(records["dead.json"]) is False
    assert lifecycle._record_alive(records["otherns.json"]) is None  # cannot judge: left alone
    assert lifecycle._record_alive({**records["me.json"], "boot": "another boot"}) is False
    assert lifecycle.sweep_stale() == []  # nothing released (no such backend), nothing raised
    left = sorted(p.name for p in state.iterdir())
    assert left == ["broken.json", "garbage.json", "me.json", "otherns.json"]


def test_lifecycle_owns_only_the_library_s_connection_names():
    from btns_vici import lifecycle

    ok = lifecycle.OWNABLE.fullmatch
    assert ok("btns-init-0123456789ab") and ok("btns-resp-abcdefabcdef")
    for name in ("", "btns-leap-0123456789ab", "office/child", "btns-init-0123", "btns-init-0123456789ab/x"):
        assert not ok(name)


def test_lifecycle_reaps_connections_whose_sockets_closed(tmp_path, monkeypatch):
    """The reaper releases a connection once every socket using it is closed (dups count)."""
    import socket

    from btns_vici import lifecycle

    monkeypatch.setenv("BTNS_STATE_DIR", str(tmp_path / "owned"))
    released: list[str] = []

    class FakeBackend:  # records what would be unloaded; the real unload is tested on the testbed
        name = "fake"
        options: dict[str, str] = {}

        def release(self, name: str) -> bool:
            released.append(name)
            return True

    owner = lifecycle.Owner()
    owner._swept = True
    a, b = socket.socket(), socket.socket()
    be = FakeBackend()
    owner.own(be, "btns-init-0123456789ab", a)
    owner.own(be, "btns-init-0123456789ab", b)
    owner.hold(be, "btns-resp-0123456789ab")
    record = json.loads(owner.record_path.read_text())
    assert sorted(x["name"] for x in record["loaded"]) == ["btns-init-0123456789ab", "btns-resp-0123456789ab"]
    a.close()
    assert owner.reap() == [] and released == []
    dup = b.dup()
    b.close()
    assert owner.reap() == []  # the dup still holds the socket
    dup.close()
    assert owner.reap() == ["btns-init-0123456789ab"] and released == ["btns-init-0123456789ab"]
    owner.unhold(be, "btns-resp-0123456789ab")
    assert owner.owned() == [] and not owner.record_path.exists()
    assert not (tmp_path / "owned").exists()  # the empty state directory went with the last record
    owner._wake.set()


def test_the_fast_selector_compiler_agrees_with_parse_ts():
    """compiled.spec_compiled's fast IPv4 path must mean exactly what parse.parse_ts means."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from btns_vici.strongswan import parse
    from btns_vici.strongswan.compiled import _fast_v4, spec_compiled
    from btns_vici.strongswan.compiled import compiled as _compiled

    fixed = [
        "10.231.0.1/32",
        "10.231.0.1/32[tcp]",
        "10.231.0.2/32[tcp/20000]",
        "10.0.0.0/8[udp/5000-6000]",
        "0.0.0.0/0",
        "10.0.0.1/32[47]",
        "192.168.1.7/24[tcp/1-65535]",
        "10.0.0.1/33",
        "010.0.0.1/32",
        "300.0.0.1/32",
        "10.0.0.1/32[tcp/70000]",
        "10.0.0.1/32[tcp/9-3]",
        "fd00::1/128[tcp/80]",
        "10.0.0.1..10.0.0.9",
        "10.0.0.1/32[tcp/http]",
        "\u0661\u0660.0.0.1/32",  # Arabic-Indic digits: not an address
    ]

    def same(spec: str) -> None:
        try:
            want = _compiled((parse.parse_ts(spec),))
        except Exception as exc:  # the strict parser's verdict is the reference
            assert _fast_v4(spec) is None, spec
            with pytest.raises(type(exc)):
                spec_compiled(spec)
            return
        assert spec_compiled(spec) == want, spec
        fast = _fast_v4(spec)
        assert fast is None or fast == want, spec

    for spec in fixed:
        same(spec)

    octet = st.integers(0, 260).map(str)
    port = st.integers(0, 66000).map(str)

    @settings(max_examples=300, deadline=None)
    @given(
        st.tuples(octet, octet, octet, octet),
        st.integers(0, 34),
        st.sampled_from(["", "tcp", "udp", "6", "17", "0", "300"]),
        st.one_of(st.just(""), port, st.tuples(port, port).map("-".join)),
    )
    def check(octets, bits, proto, ports):
        spec = ".".join(octets) + f"/{bits}"
        if proto:
            spec += f"[{proto}" + (f"/{ports}" if ports else "") + "]"
        same(spec)

    check()


# -- the coverage cache shared between processes (strongswan.coverage): hints, never answers ------

_A, _B = int(ipaddress.ip_address("10.0.0.1")), int(ipaddress.ip_address("10.0.0.2"))


def _cov_conns(n: int = 3) -> dict[str, coverage.ConnConfig]:
    children = {f"c{i}": (((4, _A, _A, 6, 0, 65535),), ((4, _B, _B, 6, 20000 + i, 20000 + i),)) for i in range(n)}
    children["wide"] = (((4, 0, 2**32 - 1, 0, 0, 65535),), ((4, _B, _B + 255, 17, 0, 65535),))
    auth = {"class": b"pre-shared key", "certs": [b"x\xff"]}
    return {"edge": coverage.ConnConfig(7, auth, {"class": b"public key"}, children)}


@pytest.fixture
def cov(tmp_path, monkeypatch):
    monkeypatch.setenv("BTNS_CACHE_DIR", str(tmp_path / "cache"))
    vici = tmp_path / "charon.vici"
    vici.touch()
    return str(vici)


def test_coverage_round_trip_private_and_looked_up_by_flow(cov):
    assert coverage.write(cov, _cov_conns())
    path = coverage.cache_file(cov)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    got = coverage.read(cov)
    assert got is not None and got.conns["edge"].max_ike == 7
    assert got.conns["edge"].local == {"class": b"pre-shared key", "certs": [b"x\xff"]}
    assert got.candidates(4, _A, 40000, _B, 20001, 6) == {"edge": {"c1"}}
    assert got.candidates(4, _A, 40000, _B + 3, 53, 17) == {"edge": {"wide"}}
    assert got.candidates(4, _A, 40000, _B, 29999, 6) == {}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_coverage_serves_only_ike_sas_established_when_fetched(cov):
    """max_ike 7, IKE_SA 3 connecting then: 3 and 8 are not served, 2 and 7 are; a file of the
    previous format (no ``pending``) is ignored."""
    conns = _cov_conns()
    e = conns["edge"]
    assert coverage.write(cov, {"edge": coverage.ConnConfig(7, e.local, e.remote, e.children, frozenset({3}))})
    got = coverage.read(cov)
    assert got is not None
    entry = got.conns["edge"]
    assert [entry.serves(u) for u in ("2", "3", "7", "8", "x", "\u0663")] == [True, False, True, False, False, False]
    path = coverage.cache_file(cov)
    head, rest = path.read_text().split("\n", 1)
    old = json.loads(head)
    old["version"] = 1
    for c in old["conns"].values():
        del c["pending"]
    path.write_text(json.dumps(old) + "\n" + rest)
    assert coverage.read(cov) is None
    assert coverage.known_ikes(
        [
            ("a", {"uniqueid": b"4", "state": b"ESTABLISHED"}),
            ("(unnamed)", {"uniqueid": b"6", "state": b"CONNECTING"}),
            ("b", {"uniqueid": b"5", "state": [b"x"]}),
        ]
    ) == (6, frozenset({5, 6}))


def test_coverage_of_another_or_restarted_charon_is_ignored(cov):
    assert coverage.write(cov, _cov_conns())
    os.unlink(cov)
    Path(cov).touch()  # charon restarted: a new socket
    assert coverage.read(cov) is None
    os.unlink(cov)
    assert coverage.read(cov) is None and not coverage.write(cov, _cov_conns())


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "bad-header", "bad-selector", "nested", "binary"],
)
def test_a_corrupted_coverage_file_is_ignored_never_raised(cov, damage):
    assert coverage.write(cov, _cov_conns())
    path = coverage.cache_file(cov)
    raw = path.read_bytes()
    head, _, rest = raw.partition(b"\n")
    bad = {
        "garbage": os.urandom(5000),
        "truncated": raw[: len(raw) - 7],
        "empty": b"",
        "bad-header": b'{"version": 1, "charon": 5}\n' + rest,
        "bad-selector": head + b'\nR 4 %d 6 20001\t["edge","c1",[[4,1]],[]]\n' % _B,
        "nested": head.replace(b'"class":"public key"', b'"class":' + b"[" * 50 + b"]" * 50),
        "binary": head + b"\n\xff\xfe\n",
    }[damage]
    path.write_bytes(bad)
    got = coverage.read(cov)
    if got is not None:  # only per-line damage survives the header check: then the lookup refuses it
        with pytest.raises(coverage.Invalid):
            got.candidates(4, _A, 40000, _B, 20001, 6)


def test_an_oversized_coverage_file_is_neither_read_nor_written(cov, monkeypatch):
    assert coverage.write(cov, _cov_conns())
    path = coverage.cache_file(cov)
    with path.open("ab") as f:
        f.truncate(coverage.MAX_BYTES + 1)
    assert coverage.read(cov) is None
    monkeypatch.setattr(coverage, "MAX_BYTES", 2000)
    assert coverage.render(cov, _cov_conns(100)) is None and not coverage.write(cov, _cov_conns(100))


def test_a_coverage_file_of_another_uid_or_not_private_is_ignored(cov):
    assert coverage.write(cov, _cov_conns())
    path = coverage.cache_file(cov)
    path.chmod(0o644)
    assert coverage.read(cov) is None
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        assert coverage.read(cov) is None
        os.chown(path, 0, 0)
    assert coverage.read(cov) is not None
    link = path.with_name("elsewhere")
    path.rename(link)
    path.symlink_to(link)
    assert coverage.read(cov) is None  # O_NOFOLLOW


def test_coverage_rewrite_keeps_the_other_connections_lines(cov):
    assert coverage.write(cov, _cov_conns())
    old = coverage.read(cov)
    other = {"other": coverage.ConnConfig(9, None, None, {"o": (((4, _A, _A, 6, 1, 1),), ((4, _B, _B, 6, 5, 5),))})}
    assert coverage.write(cov, other, keep=old)
    got = coverage.read(cov)
    assert got is not None and set(got.conns) == {"edge", "other"}
    assert got.candidates(4, _A, 40000, _B, 20002, 6) == {"edge": {"c2"}}
    assert got.candidates(4, _A, 1, _B, 5, 6) == {"other": {"o"}}


# -- one listing at a time per charon in a process (charon's selector formatting is not reentrant)


def _listing_charon(inflight: list[int], peak: list[int], hold: float):
    lock = threading.Lock()

    def handler(conn: socket.socket) -> None:
        while (req := read_request(conn)) is not None:
            if req[0] in (3, 4):  # a streamed listing's event (un)registration
                conn.sendall(packet(5))
                continue
            if req[1].startswith("list-"):
                with lock:
                    inflight[0] += 1
                    peak[0] = max(peak[0], inflight[0])
                time.sleep(hold)
                with lock:
                    inflight[0] -= 1
            conn.sendall(response())

    return handler


def test_listings_of_one_process_never_overlap_in_charon(sock_path):
    """Two sessions (the index's and its warmer's) listing at once: charon sees one at a time."""
    inflight, peak = [0], [0]
    with FakeVici(sock_path, _listing_charon(inflight, peak, 0.2)):
        sessions = [ViciSession(sock_path, timeout=DEADLINE) for _ in range(3)]
        threads = [threading.Thread(target=s.list_conns if i % 2 else s.list_sas) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in sessions:
            s.close()
    assert peak[0] == 1


def test_waiting_for_another_listing_counts_against_the_deadline(sock_path):
    inflight, peak = [0], [0]
    with FakeVici(sock_path, _listing_charon(inflight, peak, 5.0)):
        slow = ViciSession(sock_path, timeout=10)
        t = threading.Thread(target=slow.list_sas)
        t.start()
        time.sleep(0.2)
        err, took = timed(ViciSession(sock_path, timeout=0.5, list_timeout=0.5).list_conns)
        t.join()
        slow.close()
    assert isinstance(err, DaemonTimeoutError) and err.errno == errno.ETIMEDOUT
    assert "another listing" in str(err) and took < 1.5


# -- charon's selectors are confirmed by a second listing before they make an answer positive -------
# (charon formats them with the non-reentrant getprotobynumber/getservbyport: concurrent listings
# of other processes can turn tcp into udp; README "Backends", strongSwan)


def _psk4(remote_ts: bytes) -> dict:
    msg = decode_bytes((DATA / "list-sas-psk4.vici").read_bytes())
    for child in msg["psk4"]["child-sas"].values():
        child["remote-ts"] = [remote_ts]
    return msg


def _charon_listing(answer) -> Callable:
    """A charon whose list-sas reply is ``answer(filters, nth)`` (filters: the request's message)."""
    from .fake_vici import _read

    calls = [0]

    def handler(conn: socket.socket) -> None:
        while True:
            head = _read(conn, 4)
            if head is None:
                return
            body = _read(conn, struct.unpack("!I", head)[0])
            if body is None:
                return
            kind, name = body[0], body[2 : 2 + body[1]].decode()
            if kind in (3, 4):
                conn.sendall(packet(5))
            elif name == "list-sas":
                filters = decode_bytes(body[2 + body[1] :]) if len(body) > 2 + body[1] else {}
                calls[0] += 1
                msg = answer(filters, calls[0])
                if filters.get("child") == b"#btns-vici:no-child#":
                    msg = copy.deepcopy(msg)
                    for sec in msg.values():
                        sec["child-sas"] = {}
                conn.sendall(event("list-sa", msg))
                conn.sendall(response())
            elif name == "version":
                conn.sendall(response({"daemon": "charon", "version": "5.9.8"}))
            elif name.startswith("list-"):
                conn.sendall(response())
            else:
                conn.sendall(packet(2))

    return handler


def _index(sock_path):
    return SAIndex(sock_path, ViciSession(sock_path, timeout=2), timeout=2, shared_cache=False)


def test_a_garbled_selector_never_makes_an_answer_positive(sock_path):
    """The index's listing says tcp (garbled), a second listing says udp (true): a TCP flow is not covered."""
    honest, garbled = _psk4(b"10.231.0.2/32[udp]"), _psk4(b"10.231.0.2/32[tcp]")
    with FakeVici(sock_path, _charon_listing(lambda f, n: honest if "child-id" in f else garbled)):
        index = _index(sock_path)
        try:
            assert index.find(FLOW) is None
            udp = Flow(socket.IPPROTO_UDP, FLOW.local_addr, 5000, FLOW.remote_addr, 53)
            found = index.find(udp)
            assert found is not None and found[1].remote_ts[0].proto == socket.IPPROTO_UDP
        finally:
            index.close()


def test_agreeing_listings_confirm_once(sock_path):
    honest = _psk4(b"10.231.0.2/32[tcp]")
    seen: list[dict] = []

    def answer(filters, n):
        seen.append(filters)
        return honest

    with FakeVici(sock_path, _charon_listing(answer)):
        index = _index(sock_path)
        try:
            assert index.find(FLOW) is not None
            confirms = sum(1 for f in seen if "child-id" in f)
            for _ in range(5):
                assert index.find(FLOW) is not None
            assert confirms == 1 and sum(1 for f in seen if "child-id" in f) == 1  # later answers: no re-read
        finally:
            index.close()


def test_selectors_that_never_agree_are_eproto(sock_path):
    flip = [_psk4(b"10.231.0.2/32[tcp]"), _psk4(b"10.231.0.2/32[tcp/80]"), _psk4(b"10.231.0.2/32[tcp/1-1000]")]
    with FakeVici(sock_path, _charon_listing(lambda f, n: flip[n % 3])):
        index = _index(sock_path)
        try:
            with pytest.raises(ProtocolError) as exc:
                index.find(FLOW)
            assert exc.value.errno == errno.EPROTO and "different traffic selectors" in str(exc.value)
        finally:
            index.close()


def test_a_garbled_selector_never_makes_an_answer_negative(sock_path):
    """The index's listing says tcp (garbled), a second listing says udp (true): the UDP flow is covered."""
    honest, garbled = _psk4(b"10.231.0.2/32[udp]"), _psk4(b"10.231.0.2/32[tcp]")
    udp = Flow(socket.IPPROTO_UDP, FLOW.local_addr, 5000, FLOW.remote_addr, 53)
    with FakeVici(sock_path, _charon_listing(lambda f, n: honest if "child-id" in f else garbled)):
        index = _index(sock_path)
        try:
            found = index.find(udp)
            assert found is not None and found[1].remote_ts[0].proto == socket.IPPROTO_UDP
            assert index.find(FLOW) is None
        finally:
            index.close()


# -- btns sas: the auth rounds from the coverage cache once a listing wrote them --------------------


def _charon_with_config(sas: dict, conn: dict, seen: list[str]):
    """list-sas answers ``sas``, list-conns ``conn``; every request's name goes to ``seen``."""

    def listing(command):
        seen.append(command)
        if command == "list-sas":
            return [event("list-sa", sas)]
        if command == "list-conns":
            return [event("list-conn", conn)]
        return []

    return scripted(listing)


def test_listing_takes_auth_rounds_from_the_coverage_cache(sock_path, tmp_path, monkeypatch):
    from btns_vici.strongswan.listing import list_records

    monkeypatch.setenv("BTNS_CACHE_DIR", str(tmp_path / "cache"))
    sas = decode_bytes((DATA / "list-sas-psk4.vici").read_bytes())
    conns = decode_bytes((DATA / "list-conns-psk4.vici").read_bytes())
    seen: list[str] = []
    with FakeVici(sock_path, _charon_with_config(sas, conns, seen)):
        session = ViciSession(sock_path, timeout=DEADLINE)
        first = list_records(session)
        assert seen.count("list-conns") == 1
        second = list_records(session)
        assert seen.count("list-conns") == 1  # the auth rounds came from the cache
        assert [(i.name, i.local, i.remote) for i in second] == [(i.name, i.local, i.remote) for i in first]
        assert first[0].remote.auth_method is not None
        # an IKE_SA newer than the cached configuration: fetched live again
        newer = copy.deepcopy(sas)
        newer["psk4"]["uniqueid"] = b"99"
        sas.clear()
        sas.update(newer)
        list_records(session)
        assert seen.count("list-conns") == 2
        session.close()


def test_a_configuration_cached_while_an_ike_sa_was_connecting_is_not_its_auth(sock_path, tmp_path, monkeypatch):
    """A responder's IKE_SA has a uniqueid from IKE_SA_INIT on but picks its configuration at
    IKE_AUTH: a listing that cached connection psk4's auth rounds (pre-shared key) while that IKE_SA
    was CONNECTING must not serve it once established after psk4 was reloaded with EAP."""
    from btns_vici.core.constants import AuthMethod
    from btns_vici.strongswan.listing import list_records

    monkeypatch.setenv("BTNS_CACHE_DIR", str(tmp_path / "cache"))
    sas = decode_bytes((DATA / "list-sas-psk4.vici").read_bytes())
    conns = decode_bytes((DATA / "list-conns-psk4.vici").read_bytes())
    sas["psk4"].update(state=b"CONNECTING", initiator=b"no")
    sas["psk4"].pop("child-sas", None)
    sas["(unnamed)"] = sas.pop("psk4")  # (charon's name for an IKE_SA without a configuration yet)
    seen: list[str] = []
    with FakeVici(sock_path, _charon_with_config(sas, conns, seen)):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            assert list_records(session)[0].remote.auth_method == AuthMethod.NONE  # psk4 written to the cache
            assert seen.count("list-conns") == 1
            reloaded = copy.deepcopy(conns)
            reloaded["psk4"]["remote-1"]["class"] = b"EAP"
            conns.clear()
            conns.update(reloaded)
            sas["psk4"] = sas.pop("(unnamed)")
            sas["psk4"]["state"] = b"ESTABLISHED"  # authenticated under the reloaded configuration
            again = list_records(session)
            assert again[0].remote.auth_method == AuthMethod.EAP
            assert seen.count("list-conns") == 2
        finally:
            session.close()


# -- listings (btns sas, btns sockets, index=list): each CHILD_SA's selectors on two agreeing reads --


def test_a_listing_rests_on_two_agreeing_reads_and_reads_a_garbled_ip_again(sock_path):
    """First read ``[ip]`` (charon's garbled protocol name for 0: any protocol, a widening), then
    ``[tcp/http]`` twice: the listing says tcp port 80, after three list-sas."""
    from btns_vici.strongswan.listing import confirmed_sas

    reads = [b"10.231.0.2/32[ip]", b"10.231.0.2/32[tcp/http]", b"10.231.0.2/32[tcp/http]"]
    with FakeVici(sock_path, _charon_listing(lambda f, n: _psk4(reads[min(n, 3) - 1]))):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            _sas, kids = confirmed_sas(session)
        finally:
            session.close()
    (child,) = kids["2"].values()
    (ts,) = child.remote_ts
    assert (ts.proto, ts.port_lo, ts.port_hi) == (socket.IPPROTO_TCP, 80, 80)


def test_a_listing_that_never_agrees_is_eproto(sock_path):
    from btns_vici.strongswan import listing

    ports = iter(range(1000, 2000))
    with FakeVici(sock_path, _charon_listing(lambda f, n: _psk4(b"10.231.0.2/32[tcp/%d]" % next(ports)))):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            with pytest.raises(ProtocolError) as exc:
                listing.confirmed_sas(session)
            assert exc.value.errno == errno.EPROTO
        finally:
            session.close()


def test_a_listing_of_bare_address_selectors_needs_one_read(sock_path):
    """No protocol, so charon looked no name up: nothing to garble, nothing to read twice."""
    from btns_vici.strongswan import listing

    calls = []
    with FakeVici(sock_path, _charon_listing(lambda f, n: calls.append(n) or _psk4(b"10.231.0.2/32"))):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            _sas, kids = listing.confirmed_sas(session)
        finally:
            session.close()
    assert calls == [1] and [c.remote_ts[0].proto for c in kids["2"].values()] == [0]


def test_the_second_read_that_finds_the_child_deleting_makes_no_positive_answer(sock_path):
    """The index holds CHILD_SA 2 INSTALLED (its up event, or a listing); the confirming read (list-sas
    ike-id child-id, newer) says DELETING with the same selectors: no positive answer from the older read."""
    installed = _psk4(b"10.231.0.2/32[tcp]")
    deleting = copy.deepcopy(installed)
    for child in deleting["psk4"]["child-sas"].values():
        child["state"] = b"DELETING"
    with FakeVici(sock_path, _charon_listing(lambda f, n: deleting if "child-id" in f else installed)):
        index = _index(sock_path)
        try:
            assert index.find(FLOW) is None
        finally:
            index.close()


def test_a_listing_whose_children_come_and_go_between_reads_is_not_eproto(sock_path):
    """Every whole listing shows a CHILD_SA that the one before did not (rekeyed, or just up): those
    few are read alone (list-sas ike-id child-id) instead of failing the listing."""
    from btns_vici.strongswan.listing import confirmed_sas

    def listing(filters, n):
        msg = _psk4(b"10.231.0.2/32[tcp/http]")
        kids = msg["psk4"]["child-sas"]
        (stable,) = kids.values()
        fresh = copy.deepcopy(stable)
        fresh["uniqueid"] = b"%d" % (100 + n)
        if "child-id" in filters:
            cid = filters["child-id"]
            kids.clear()
            if cid == b"2":
                kids["host-2"] = stable
            elif int(cid) >= 100:
                fresh["uniqueid"] = cid
                kids[f"host-{cid.decode()}"] = fresh
        else:
            kids[f"host-{100 + n}"] = fresh
        return msg

    with FakeVici(sock_path, _charon_listing(listing)):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            _sas, kids = confirmed_sas(session)
        finally:
            session.close()
    assert "2" in kids["2"] and len(kids["2"]) == 2


def _psk4_conn(remote_ts: bytes) -> dict:
    conn = decode_bytes((DATA / "list-conns-psk4.vici").read_bytes())
    (name,) = conn
    conn[name]["children"] = {
        "host": {"mode": b"TUNNEL", "local-ts": [b"10.231.0.1/32"], "remote-ts": [remote_ts]},
    }
    return conn


@pytest.mark.parametrize(
    ("configured", "list_sas_calls"),
    [(b"10.231.0.2/32[tcp/http]", 1), (b"10.231.0.2/32[tcp/https]", 2), (b"dynamic", 2)],
    ids=["config-agrees", "config-differs", "config-dynamic"],
)
def test_a_listing_agreeing_with_the_configuration_needs_one_read(sock_path, tmp_path, monkeypatch, configured,
                                                                   list_sas_calls):  # fmt: skip
    """list-conns is a second, independent read of a per-port child's selectors: when its child
    config says what list-sas said, no second list-sas; otherwise one (and the listing still says
    what two list-sas agree on)."""
    from btns_vici.strongswan.listing import list_records

    monkeypatch.setenv("BTNS_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[str] = []
    sas = _psk4(b"10.231.0.2/32[tcp/http]")
    with FakeVici(sock_path, _charon_with_config(sas, _psk4_conn(configured), seen)):
        session = ViciSession(sock_path, timeout=DEADLINE)
        try:
            (ike,) = list_records(session)
            assert seen.count("list-sas") == list_sas_calls
            (ts,) = ike.children[0].remote_ts
            assert (ts.proto, ts.port_lo) == (socket.IPPROTO_TCP, 80)
            seen.clear()
            list_records(session)  # the configuration from the coverage cache now: the same rule
            assert seen.count("list-conns") == 0 and seen.count("list-sas") == list_sas_calls
        finally:
            session.close()
