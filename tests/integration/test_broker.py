"""btnsd on the host testbed: a real broker (root) and real clients, unprivileged ones included.

The broker speaks for both peers' namespaces. Unprivileged clients run as ``nobody`` inside
peer A's namespace, from a venv on Debian's own python3 (the pyenv interpreter is not
readable by other users), with ``BTNS_BROKER`` naming the broker's socket.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import btns_vici
from btns_lab.testbed import Testbed, connected_pair
from btns_vici import Setting
from btns_vici.broker import protocol
from btns_vici.broker.client import BrokerClient

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


class Broker:
    def __init__(self, path: str, proc: subprocess.Popen[bytes], conf: Path, log: Path) -> None:
        self.path, self.proc, self.conf, self.log = path, proc, conf, log

    def client(self) -> BrokerClient:
        return BrokerClient(self.path)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def start_broker(tb: Testbed, workdir: Path, extra: str = "", args: tuple[str, ...] = ()) -> Broker:
    conf = workdir / "btnsd.toml"
    keys = workdir / "keys"
    conf.write_text(
        textwrap.dedent(f"""
        [broker]
        idle_timeout = 30
        [[backend]]
        name = "strongswan"
        vici_socket = "{tb.a.vici_path}"
        netns = "{tb.a.netns}"
        key_dir = "{keys}-a"
        peer_keys = "{workdir}/peers-a"
        [[backend]]
        name = "strongswan"
        vici_socket = "{tb.b.vici_path}"
        netns = "{tb.b.netns}"
        key_dir = "{keys}-b"
        peer_keys = "{workdir}/peers-b"
    """)
        + extra
    )
    path = str(workdir / "btnsd.sock")
    log = workdir / "btnsd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "btns_vici.broker", "--socket", path, "--config", str(conf), "-v", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if os.path.exists(path) and BrokerClient(path, timeout=1).probe():
            return Broker(path, proc, conf, log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"btnsd did not start: {log.read_text()}")


def stop_broker(b: Broker) -> None:
    if b.proc.poll() is None:
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(10)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp is root's, mode 0700); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(testbed: Testbed) -> Iterator[Broker]:
    with shared_dir("btns-brk-") as work:
        yield from _broker(testbed, work)


def _broker(testbed: Testbed, work: Path) -> Iterator[Broker]:
    for side in ("a", "b"):
        (work / f"peers-{side}").mkdir()
    b = start_broker(testbed, work)
    yield b
    stop_broker(b)


@pytest.fixture(scope="module")
def unpriv_python() -> Iterator[str]:
    """A venv on Debian's python3 that ``nobody`` can run, seeing this checkout and the test venv's packages."""
    with shared_dir("btns-unpriv-") as root:
        yield _unpriv_venv(root)


def _unpriv_venv(root: Path) -> str:
    venv = root / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "btns-test.pth").write_text(f"{REPO / 'src'}\n{REPO / 'plugins/btns-libreswan/src'}\n{ours}\n")
    for p in [root, *root.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode | 0o005 | (0o010 if p.is_dir() else 0))
    return str(venv / "bin" / "python")


def run_as_nobody(tb: Testbed, python: str, code: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Run ``code`` as nobody in peer A's namespace; it prints one JSON object as its last line."""
    assigns = [f"{k}={v}" for k, v in env.items()]
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            tb.a.netns,
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            *assigns,
            python,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result (exit {res.returncode}): {res.stdout}\n{res.stderr}"
    return json.loads(lines[-1])


def serve_in_b(tb: Testbed, port: int) -> tuple[socket.socket, list]:
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((str(tb.b.v4), port))
    srv.listen(8)
    got: list = []

    def run() -> None:
        srv.settimeout(30)
        try:
            while True:
                conn, _ = srv.accept()
                got.append(conn)
                conn.sendall(b"hello from b")
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return srv, got


QUERY = """
    import json, os, socket, btns_vici
    s = socket.socket()
    s.settimeout(10)
    s.connect((os.environ["PEER"], int(os.environ["PORT"])))
    s.recv(64)
    out = {"uid": os.getuid()}
    try:
        t = btns_vici.get_socket_ptoken(s)
        out.update(protected=t.protected, privacy=t.privacy_protected.name, info=t.information_string,
                   peer=t.itoken.audit_string if t.itoken else None)
    except OSError as exc:
        out.update(errno=exc.errno, error=str(exc))
    print(json.dumps(out))
"""


def test_an_unprivileged_process_asks_through_the_broker(tb, broker, unpriv_python):
    tb.up("brk1", "rawkey", 4)
    srv, conns = serve_in_b(tb, 28001)
    with srv:
        env = {"PEER": str(tb.b.v4), "PORT": "28001", "BTNS_BROKER": broker.path}
        out = run_as_nobody(tb, unpriv_python, QUERY, env)
        assert out["uid"] != 0
        assert out.get("protected") is True, out
        assert out["privacy"] == "LEVEL_HIGH" and "b-brk1-v4@btns.test" in out["peer"]
        # The same process without the broker: charon's VICI socket is root's, the truth is EACCES.
        denied = run_as_nobody(tb, unpriv_python, QUERY, {k: v for k, v in env.items() if k != "BTNS_BROKER"})
        assert denied.get("errno") in (errno.EACCES, errno.ECONNREFUSED, errno.ENOENT), denied
        for c in conns:
            c.close()


DEMAND = """
    import json, os, socket, btns_vici
    from btns_vici import PToken, Setting, IToken, AuthMethod
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    s = socket.socket()
    s.settimeout(20)
    out = {}
    try:
        btns_vici.set_socket_ptoken(s, p)
        btns_vici.connect(s, (os.environ["PEER"], int(os.environ["PORT"])), latch_=False)
        s.recv(64)
        tok = btns_vici.get_socket_ptoken(s)
        out.update(protected=tok.protected, info=tok.information_string,
                   method=tok.itoken.authentication_method.name)
    except OSError as exc:
        out.update(errno=exc.errno, error=str(exc))
    print(json.dumps(out))
"""


def test_an_unprivileged_process_demands_btns_and_the_broker_negotiates(tb, broker, unpriv_python):
    # Both brokers' host keys are each other's peer keys (the operator's one-time exchange).
    from btns_vici.hostkey import load_or_create

    conf = broker.conf.read_text()
    work = broker.conf.parent
    key_a, key_b = load_or_create(str(work / "keys-a")), load_or_create(str(work / "keys-b"))
    (work / "peers-a" / "b.pem").write_bytes(key_b.public_pem)
    (work / "peers-b" / "a.pem").write_bytes(key_a.public_pem)
    assert "keys-a" in conf
    listener = btns_vici.PToken()
    listener.privacy_protected = Setting.LEVEL_MEDIUM
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.bind((str(tb.b.v4), 28002))
    b_backend = BrokerClient(broker.path)
    btns_vici.set_socket_ptoken(srv, listener, b_backend)
    btns_vici.listen(srv, 4, b_backend)
    accepted: list = []

    def acc() -> None:
        srv.settimeout(30)
        with __import__("contextlib").suppress(OSError):
            conn, _ = btns_vici.accept(srv, b_backend, latch_=False)
            conn.sendall(b"hi")
            accepted.append(conn)

    threading.Thread(target=acc, daemon=True).start()
    out = run_as_nobody(tb, unpriv_python, DEMAND, {"PEER": str(tb.b.v4), "PORT": "28002", "BTNS_BROKER": broker.path})
    srv.close()
    assert out.get("protected") is True, (out, broker.log.read_text()[-2000:])
    assert out["method"] in ("BTNS", "LEAPOFFAITH")
    # The client process exited: what the broker loaded for it is unloaded (the responder conn stays:
    # its client, this test process, is still connected).
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [n for entry in tb.a.session().list_conns() for n in entry]
        if not any(n.startswith("btns-init") for n in names):
            break
        time.sleep(0.1)
    assert not any(n.startswith("btns-init") for n in names), names
    for c in accepted:
        c.close()
    b_backend.close()
    tb.a.close_sessions()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(path)
            return s
        except BlockingIOError:  # backlog full while the broker accepts the others
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _ask(s: socket.socket, packet: bytes, fds: list[int] | None = None) -> dict:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([packet], anc)
    _, payload = protocol.decode(s.recv(protocol.MAX_FRAME), protocol.RESPONSE)
    return payload


def test_hostile_clients_get_precise_errors_and_leak_nothing(tb, broker, tmp_path):
    before = broker.fds()
    s = _raw(broker.path)
    with s:
        assert _ask(s, b"garbage")["errno"] == errno.EPROTO
        assert _ask(s, protocol.request("nosuch", 1))["errno"] == errno.EOPNOTSUPP
        assert _ask(s, protocol.request("get_socket_ptoken", 2))["errno"] == errno.EBADF  # no descriptor
        r, w = os.pipe()
        try:
            assert _ask(s, protocol.request("get_socket_ptoken", 3), [r])["errno"] == errno.ENOTSOCK
            many = [os.dup(r) for _ in range(200)]
            try:  # 200 descriptors: the broker's buffer holds one, the kernel discards the rest
                assert _ask(s, protocol.request("get_socket_ptoken", 4), many)["errno"] in (errno.EMSGSIZE, errno.EBADF)
            finally:
                for fd in many:
                    os.close(fd)
        finally:
            os.close(r)
            os.close(w)
        s.send(b"BT\x01\x01" + bytes(4) + (70000).to_bytes(4, "big") + bytes(65000))
        assert protocol.decode(s.recv(protocol.MAX_FRAME), protocol.RESPONSE)[1]["errno"] in (
            errno.EMSGSIZE,
            errno.EPROTO,
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unconnected:
            assert _ask(s, protocol.request("get_socket_ptoken", 5), [unconnected.fileno()])["errno"] == errno.ENOTCONN
        bad = protocol.request("set_socket_ptoken", 6, ptoken={"attrs": {"informationString": "00"}})
        with socket.socket() as fresh:
            assert _ask(s, bad, [fresh.fileno()])["errno"] in (errno.EPERM, errno.EINVAL)
        assert _ask(s, protocol.request("hello", 7))["ok"] is True  # still served after all that
    time.sleep(0.3)
    assert broker.fds() <= before + 1, "descriptors left behind in the broker"


def test_a_socket_of_a_namespace_no_backend_speaks_for_is_unprotected(broker):
    with socket.socket() as lst, socket.socket() as cli:  # the test's own (host) namespace
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli.connect(lst.getsockname())
        tok = broker.client().get_socket_ptoken(cli)
    assert not tok.protected and "no backend for the socket's namespace" in tok.information_string


def test_a_thousand_concurrent_clients(tb, broker):
    tb.up("brk2", "rawkey", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4)
    with cli, srv:
        clients = [_raw(broker.path) for _ in range(1000)]
        try:
            frame = protocol.request("get_socket_ptoken", 1)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [cli.fileno()]).tobytes())]
            for c in clients:
                c.sendmsg([frame], anc)
            answers = [protocol.decode(c.recv(protocol.MAX_FRAME), protocol.RESPONSE)[1] for c in clients]
        finally:
            for c in clients:
                c.close()
    assert all(a["ok"] for a in answers)
    assert all(protocol.ptoken_from_wire(a["result"]["ptoken"], trusted=True).protected for a in answers[:10])


def test_the_broker_restarts_and_clients_reconnect(tb, testbed, tmp_path):
    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    b = start_broker(testbed, tmp_path)
    c = b.client()
    try:
        assert c.hello()["server"] == "btnsd"
        b.proc.kill()  # kill -9
        b.proc.wait()
        with pytest.raises(OSError) as e:
            c.hello()
        assert e.value.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOENT)
        b = start_broker(testbed, tmp_path)
        assert c.hello()["server"] == "btnsd"  # the next call reconnects
    finally:
        c.close()
        stop_broker(b)


def test_a_client_killed_mid_request_does_not_disturb_the_broker(tb, broker, unpriv_python):
    code = """
        import socket, os, btns_vici
        from btns_vici import PToken, Setting
        p = PToken(); p.privacy_protected = Setting.LEVEL_MEDIUM
        s = socket.socket(); s.settimeout(30)
        btns_vici.set_socket_ptoken(s, p)
        print("{}", flush=True)
        btns_vici.connect(s, ("10.231.0.99", 9), latch_=False)  # nobody answers there: a long negotiation
    """
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            tb.a.netns,
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            f"BTNS_BROKER={broker.path}",
            unpriv_python,
            "-c",
            textwrap.dedent(code),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "{}"
        time.sleep(0.5)
        proc.kill()
    finally:
        proc.wait(10)
    assert broker.client().hello()["server"] == "btnsd"
    # Nothing left behind: the negotiation the client started fails (nobody answers) and its
    # connection is unloaded, half-open IKE_SA included, once the initiate's deadline passes.
    deadline = time.monotonic() + 20
    while _left_in(tb.a) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _left_in(tb.a) == [], "a negotiation for a vanished client left its connection in charon"


def _left_in(peer) -> list[str]:
    sas = [n for e in peer.ctl.list_sas() for n in e if n.startswith("btns-init-")]
    return sas + [n for c in peer.ctl.list_conns() for n in c if n.startswith("btns-init-")]


def test_systemd_socket_activation_and_unit_files(tb, testbed, tmp_path):
    path = str(tmp_path / "activated.sock")
    conf = tmp_path / "btnsd.toml"
    conf.write_text(
        f'[[backend]]\nname = "strongswan"\nvici_socket = "{testbed.a.vici_path}"\nnetns = "{testbed.a.netns}"\n'
    )
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--seqpacket",
            "-l",
            path,
            sys.executable,
            "-m",
            "btns_vici.broker",
            "--config",
            str(conf),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        c = BrokerClient(path, timeout=10)
        assert c.hello()["server"] == "btnsd"  # the first connection started it (LISTEN_FDS)
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    btnsd = Path(sys.executable).parent / "btnsd"
    service = (REPO / "conf/systemd/btnsd.service").read_text().replace("/usr/local/bin/btnsd", str(btnsd))
    (unit_dir / "btnsd.service").write_text(service)
    (unit_dir / "btnsd.socket").write_text((REPO / "conf/systemd/btnsd.socket").read_text())
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "btnsd.service"), str(unit_dir / "btnsd.socket")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_prometheus_metrics(tb, testbed, tmp_path):
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "btnsd.toml"
    conf.write_text(
        f'[[backend]]\nname = "strongswan"\nvici_socket = "{testbed.a.vici_path}"\nnetns = "{testbed.a.netns}"\n'
    )
    path = str(tmp_path / "m.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "btns_vici.broker",
            "--socket",
            path,
            "--config",
            str(conf),
            "--metrics",
            f"127.0.0.1:{port}",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(path) and BrokerClient(path, timeout=1).probe()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        c = BrokerClient(path)
        with socket.socket() as s:
            with pytest.raises(OSError):
                c.get_socket_ptoken(s)  # unconnected, no pToken: ENOTCONN
        c.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        proc.terminate()
        proc.wait(10)
    assert 'btnsd_queries_total{answer="ENOTCONN",op="get_socket_ptoken"} 1.0' in text
    assert "btnsd_request_seconds_bucket" in text and "btnsd_clients" in text


def test_an_unprivileged_c_program_asks_through_the_broker(tb, broker, unpriv_python):
    """The C ABI built against Debian's python3 (the venv nobody can run), a C program as nobody."""
    venv = Path(unpriv_python).parent.parent
    subprocess.run(
        [unpriv_python, "-m", "btns_vici.cabi.build", "build", "--prefix", str(venv)], check=True, capture_output=True
    )
    pc = venv / "lib" / "pkgconfig"
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "btns-ipsec"],
        env={**os.environ, "PKG_CONFIG_PATH": str(pc)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    exe = venv / "get_ptoken"
    subprocess.run(
        ["cc", "-std=c99", "-o", str(exe), str(REPO / "examples/c/get_ptoken.c"), f"-I{REPO / 'examples/c'}", *flags],
        check=True,
    )
    for p in [venv, *venv.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode | 0o005 | (0o010 if p.is_dir() else 0))
    tb.up("brkc", "rawkey", 4)
    srv, conns = serve_in_b(tb, 28005)
    with srv:
        res = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                tb.a.netns,
                "runuser",
                "-u",
                "nobody",
                "--",
                "env",
                f"BTNS_BROKER={broker.path}",
                str(exe),
                str(tb.b.v4),
                "28005",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for c in conns:
            c.close()
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "privacyProtected" in res.stdout and "LEVEL_HIGH" in res.stdout, res.stdout
    assert "b-brkc-v4@btns.test" in res.stdout


def test_btns_sockets_for_an_unprivileged_user_through_the_broker(tb, broker, unpriv_python):
    tb.up("brks", "rawkey", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4)
    with cli, srv:
        port = cli.getsockname()[1]
        res = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                tb.a.netns,
                "runuser",
                "-u",
                "nobody",
                "--",
                "env",
                f"BTNS_BROKER={broker.path}",
                unpriv_python,
                "-m",
                "btns_vici.cli",
                "sockets",
                "--json",
                "-t",
                "state",
                "established",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        table = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                tb.a.netns,
                "runuser",
                "-u",
                "nobody",
                "--",
                "env",
                f"BTNS_BROKER={broker.path}",
                unpriv_python,
                "-m",
                "btns_vici.cli",
                "sockets",
                "-t",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 0, res.stderr
    mine = [d for d in json.loads(res.stdout) if d["local_port"] == port]
    assert len(mine) == 1 and mine[0]["status"] == "protected", mine
    assert mine[0]["protection"]["peer_id"] == "b-brks-v4@btns.test"
    assert mine[0]["processes"] == []  # root's process: not shown to nobody (as ss -p)
    assert table.returncode == 0 and "b-brks-v4@btns.test" in table.stdout, table.stdout + table.stderr


def test_through_the_broker_and_btns_sockets_a_marked_socket_is_clear(tb, broker):
    """The hostile case on the broker's and the CLI's paths: charon's bypass mark, bytes captured in clear."""
    from .wire import capture, seen

    tb.up("brkm", "rawkey", 4)
    with tb.in_netns(tb.b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tb.in_netns(tb.a):
        marked = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, marked:
        rx.bind((str(tb.b.v4), 28006))
        marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
        marked.connect((str(tb.b.v4), 28006))
        with capture(tb.b.netns, tb.b.link) as frames:
            marked.send(b"BROKER-MARKED-LEAK")
        tok = broker.client().get_socket_ptoken(marked)
        port = marked.getsockname()[1]
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "btns_vici.cli",
                "sockets",
                "--json",
                "--netns",
                tb.a.netns,
                "--vici-socket",
                tb.a.vici_path,
                "-u",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert seen(frames, b"BROKER-MARKED-LEAK")  # it left in clear
    assert not tok.protected and "mark=0x42" in tok.information_string, tok.information_string
    assert listing.returncode == 0, listing.stderr
    (row,) = [d for d in json.loads(listing.stdout) if d["local_port"] == port]
    assert row["status"] == "clear" and "mark=0x42" in row["ptoken"]["informationString"], row


def test_what_a_killed_broker_loaded_is_unloaded_at_its_next_start(tb, testbed, tmp_path, monkeypatch):
    """btnsd records the connections it loads for clients (lifecycle): after kill -9 of btnsd
    they stay in charon; the next btnsd start finds the dead owner's record and unloads them."""
    from btns_vici.hostkey import load_or_create

    monkeypatch.setenv("BTNS_STATE_DIR", str(tmp_path / "owned"))  # inherited by btnsd
    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    key_a, key_b = load_or_create(str(tmp_path / "keys-a")), load_or_create(str(tmp_path / "keys-b"))
    (tmp_path / "peers-a" / "b.pem").write_bytes(key_b.public_pem)
    (tmp_path / "peers-b" / "a.pem").write_bytes(key_a.public_pem)

    def ours(peer) -> list[str]:
        return [n for e in peer.session().list_conns() for n in e if n.startswith(("btns-init-", "btns-resp-"))]

    demand = btns_vici.PToken()
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    old_a, old_b = set(ours(tb.a)), set(ours(tb.b))  # other brokers' (the module's): not ours to judge
    b = start_broker(testbed, tmp_path)
    c = b.client()
    try:
        with tb.in_netns(tb.b):
            srv = socket.socket()
        with tb.in_netns(tb.a):
            cli = socket.socket()
        cli.settimeout(20)
        srv.bind((str(tb.b.v4), 28011))
        btns_vici.set_socket_ptoken(srv, demand, c)
        btns_vici.listen(srv, 4, c)
        btns_vici.set_socket_ptoken(cli, demand, c)
        btns_vici.connect(cli, (str(tb.b.v4), 28011), c, latch_=False)
        assert btns_vici.get_socket_ptoken(cli, c).protected
        before_a = [n for n in ours(tb.a) if n not in old_a]
        before_b = [n for n in ours(tb.b) if n not in old_b]
        assert len(before_a) == 1 and before_a[0].startswith("btns-init-"), before_a
        assert len(before_b) == 1 and before_b[0].startswith("btns-resp-"), before_b
        assert [p.name for p in (tmp_path / "owned").glob("*.json")] == [
            f"{b.proc.pid}-{__import__('btns_vici.lifecycle').lifecycle.start_time(b.proc.pid)}.json"
        ]
        b.proc.kill()  # kill -9: btnsd has no chance to unload anything
        b.proc.wait()
        assert set(before_a) <= set(ours(tb.a)) and set(before_b) <= set(ours(tb.b))
        b = start_broker(testbed, tmp_path)
        left = (set(ours(tb.a)) | set(ours(tb.b))) & set(before_a + before_b)
        assert not left, b.log.read_text()[-2000:]
        assert "unloaded stale connections of dead owners" in b.log.read_text()
        assert not list((tmp_path / "owned").glob("*.json"))
        cli.close()
        srv.close()
    finally:
        c.close()
        stop_broker(b)
        tb.a.close_sessions()
        tb.b.close_sessions()


def test_an_unprivileged_c_program_reads_a_datagram_s_ptoken_through_the_broker(tb, broker, unpriv_python):
    """ipsec_recvmsg records the receiving socket (IPSEC_CMSG_RECEIVER); ipsec_get_msg_pToken sends
    btnsd that socket: a datagram that came through the SA is protected, one that came in clear
    (captured on the link: the marker in the frame) is not."""
    from .wire import capture, esp_in_udp, seen

    venv = Path(unpriv_python).parent.parent
    subprocess.run(
        [unpriv_python, "-m", "btns_vici.cabi.build", "build", "--prefix", str(venv)], check=True, capture_output=True
    )
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "btns-ipsec"],
        env={**os.environ, "PKG_CONFIG_PATH": str(venv / "lib" / "pkgconfig")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    exe = venv / "msg_peer"
    subprocess.run(["cc", "-std=c99", "-o", str(exe), str(REPO / "tests/cabi/c/msg_peer.c"), *flags], check=True)
    for p in [venv, *venv.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode | 0o005 | (0o010 if p.is_dir() else 0))
    tb.up("brkm", "rawkey", 4)

    def receive(dest: str, port: int, marker: bytes) -> tuple[dict[str, str], list[bytes]]:
        as_nobody = ["ip", "netns", "exec", tb.b.netns, "runuser", "-u", "nobody", "--"]
        rcv = subprocess.Popen(
            [*as_nobody, "env", f"BTNS_BROKER={broker.path}", str(exe), "recv", "0.0.0.0", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert rcv.stdout is not None and rcv.stdout.readline().strip() == "ready: 1"
            with capture(tb.b.netns, tb.b.link) as frames:
                with tb.in_netns(tb.a):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with s:
                    s.sendto(marker, (dest, port))
                out, err = rcv.communicate(timeout=30)
        finally:
            if rcv.poll() is None:
                rcv.kill()
                rcv.wait()
        assert rcv.returncode == 0, out + err
        return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line), frames

    got, frames = receive(str(tb.b.v4), 28021, b"via-the-sa-0123")
    assert got["get_msg_pToken"] == "0" and got["privacyProtected"] == "5", got  # LEVEL_HIGH
    assert got["policyName"] == "brkm/host", got
    assert not seen(frames, b"via-the-sa-0123") and esp_in_udp(frames) >= 1  # it crossed encrypted
    got, frames = receive(str(tb.b.v4_plain), 28022, b"in-the-clear-45")
    assert seen(frames, b"in-the-clear-45")  # it crossed in clear ...
    assert got["get_msg_pToken"] == "0" and got["privacyProtected"] == "0", got  # ... and is said so


def test_latching_through_the_broker_is_pushed_not_polled(tb, testbed, tmp_path):
    """A latched socket's SA goes: btnsd pushes latch-broken (with the socket's key) on the
    watching connection, the client's latch breaks; metrics count it and the SAs per backend."""
    import urllib.request

    from btns_vici.backend import SAEvent
    from btns_vici.latch import LatchBroken, latch, unlatch
    from btns_vici.sockets import socket_key

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "btnsd.toml"
    conf.write_text(
        f'[[backend]]\nname = "strongswan"\nvici_socket = "{testbed.a.vici_path}"\nnetns = "{testbed.a.netns}"\n'
    )
    path = str(tmp_path / "l.sock")
    metrics_at = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "btns_vici.broker", "--socket", path, "--config", str(conf), "--metrics", metrics_at]
    )
    c = BrokerClient(path)
    notes: list[SAEvent] = []
    stop_watch = None
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(path) and BrokerClient(path, timeout=1).probe()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        tb.up("brkl", "psk", 4)
        cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28031)
        stop_watch = c.watch(notes.append)  # what the latch machinery receives, seen directly
        broken: list[LatchBroken] = []
        lt = latch(cli, c, on_break=broken.append)
        assert lt.latched.protected
        pcli, psrv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28032, plain=True)
        with pcli, psrv, pytest.raises(OSError) as e:  # a clear connection cannot be latched: btnsd verifies
            c.latch(pcli)
        assert e.value.errno == errno.EACCES
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        t0 = time.monotonic()
        tb.terminate("brkl")
        while not broken and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert broken, "the latch did not break"
        assert any(n.kind == "latch-broken" and n.raw.get("key") == list(socket_key(cli)) for n in notes), notes
        print(f"latch broken {1000 * (time.monotonic() - t0):.0f} ms after terminate returned")
        time.sleep(1.2)  # one sweep of btnsd's loop: the SA gauge
        after = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        unlatch(cli)
        cli.close()
        srv.close()
    finally:
        if stop_watch is not None:
            stop_watch()
        c.close()
        proc.terminate()
        proc.wait(10)
    assert "btnsd_latch_breaks_total 0.0" in metrics
    assert "btnsd_latch_breaks_total 1.0" in after
    assert 'btnsd_sas{backend="strongswan@' in after


def test_a_cached_protected_answer_never_outlives_the_socket_s_view_or_its_route(tb, broker):
    """btnsd caches protected answers per socket view (broker/answers.py). Hostile: after a cached
    protected answer the same socket gets charon's bypass mark, or the route to the peer moves off
    ipsec0: its bytes leave in clear (captured) and the very next answer says so."""
    from .wire import capture, seen

    tb.up("brkc2", "rawkey", 4)
    c = broker.client()
    with tb.in_netns(tb.b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tb.in_netns(tb.a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((str(tb.b.v4), 28041))
        tx.connect((str(tb.b.v4), 28041))
        first, again = c.get_socket_ptoken(tx), c.get_socket_ptoken(tx)  # the second one is the cached bytes
        assert first.protected and again.protected and first == again
        with capture(tb.b.netns, tb.b.link) as frames:
            tx.send(b"CACHE-SA-PROTECTED")
        assert not seen(frames, b"CACHE-SA-PROTECTED")
        # 1. the socket's own view changes: charon's bypass mark (table 220 is skipped)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
        with capture(tb.b.netns, tb.b.link) as frames:
            tx.send(b"CACHE-MARKED-LEAK")
        marked = c.get_socket_ptoken(tx)
        assert seen(frames, b"CACHE-MARKED-LEAK") and not marked.protected, marked.information_string
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)
        assert c.get_socket_ptoken(tx).protected
        # 2. routing changes under an unchanged socket: a more specific rule sends B's address elsewhere
        rule = ["ip", "rule", "add", "to", f"{tb.b.v4}/32", "lookup", "main", "priority", "90"]
        tb.a.exec(*rule)
        try:
            with capture(tb.b.netns, tb.b.link) as frames:
                tx.send(b"CACHE-ROUTE-LEAK")
            rerouted = c.get_socket_ptoken(tx)
        finally:
            tb.a.exec("ip", "rule", "del", "to", f"{tb.b.v4}/32", "lookup", "main", "priority", "90")
        assert seen(frames, b"CACHE-ROUTE-LEAK") and not rerouted.protected, rerouted.information_string
        assert c.get_socket_ptoken(tx).protected
    c.close()


def test_a_restarted_broker_is_told_the_latches_again(tb, testbed, tmp_path):
    """kill -9 of btnsd forgets its latches; the client's watch reconnects, re-latches, and a
    later SA loss is still pushed (latch-broken), not found by polling."""
    from btns_vici.backend import SAEvent
    from btns_vici.latch import LatchBroken, latch, unlatch
    from btns_vici.sockets import socket_key

    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    b = start_broker(testbed, tmp_path)
    c = b.client()
    notes: list[SAEvent] = []
    stop_watch = None
    try:
        tb.up("brkr", "psk", 4)
        cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28051)
        broken: list[LatchBroken] = []
        latch(cli, c, on_break=broken.append)
        stop_watch = c.watch(notes.append)
        b.proc.kill()
        b.proc.wait()
        b = start_broker(testbed, tmp_path)
        deadline = time.monotonic() + 10
        while sum(n.kind == "reset" for n in notes) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.5)  # the watch reconnects (its backoff is at most 0.5 s) and re-latches
        assert not broken
        notes.clear()
        tb.terminate("brkr")
        while not broken and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert broken, "the latch did not break after the restart: " + b.log.read_text()[-3000:]
        assert any(n.kind == "latch-broken" and n.raw.get("key") == list(socket_key(cli)) for n in notes), notes
        unlatch(cli)
        cli.close()
        srv.close()
    finally:
        if stop_watch is not None:
            stop_watch()
        c.close()
        stop_broker(b)


def test_a_descriptor_of_a_hung_file_system_never_blocks_btnsd(tb, broker):
    """A client sends a file of a FUSE file system whose server never answers (closing it waits
    uninterruptibly, fstat too): btnsd answers ENOTSOCK at once and serves everyone else."""
    from btns_vici.cli.pidfd import borrow_fd

    from ..cli.test_cli_hostile_fuse import Hostile

    h = Hostile()
    hostile = -1
    try:
        hostile = borrow_fd(h.pid, h.filefd)  # ours: closed only after the server aborted (below)
        s = _raw(broker.path)
        with s:
            for i, frame in enumerate((protocol.request("get_socket_ptoken", 1), protocol.request("verify", 2))):
                t0 = time.monotonic()
                got = _ask(s, frame, [hostile])
                assert got["errno"] == errno.ENOTSOCK and time.monotonic() - t0 < 2, (i, got)
            assert _ask(s, protocol.request("hello", 3))["ok"] is True
        assert broker.client().hello()["server"] == "btnsd"  # another client: served too
    finally:
        h.stop()  # aborts its connection: the closes waiting on it return
        if hostile >= 0:
            with contextlib.suppress(OSError):  # (ENOTCONN: the aborted connection's FLUSH)
                os.close(hostile)
