"""btnsd with worker processes (``--workers 2``) on the host testbed: real charon, real clients.

The workers read the clients and answer the hot request; everything else is forwarded to the
main process, which answers on its copy of the client's connection (README "btnsd: the broker").
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btns_lab.testbed import Testbed, connected_pair
from btns_vici import PToken, Setting
from btns_vici.broker import protocol
from btns_vici.broker.client import BrokerClient

from .test_broker import Broker, _ask, _raw, shared_dir, start_broker, stop_broker

pytestmark = pytest.mark.testbed


def _ppid_comm(pid: int) -> tuple[int, str, str]:
    with open(f"/proc/{pid}/stat") as f:
        head, rest = f.read().rsplit(")", 1)
    fields = rest.split()
    return int(fields[1]), head.split("(", 1)[1], fields[0]


def descendants(root: int) -> dict[int, str]:
    """pid -> comm of every running (not zombie) descendant of ``root``."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                table[int(name)] = _ppid_comm(int(name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, comm, state) in table.items():
            if ppid == parent and state != "Z":
                out[pid] = comm
                todo.append(pid)
    return out


def workers_of(b: Broker) -> list[int]:
    return sorted(pid for pid, comm in descendants(b.proc.pid).items() if comm == "btnsd-worker")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(what, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


@pytest.fixture(scope="module")
def wbroker(testbed: Testbed) -> Iterator[Broker]:
    with shared_dir("btns-brkw-") as work:
        for side in ("a", "b"):
            (work / f"peers-{side}").mkdir()
        b = start_broker(testbed, work, args=("--workers", "2"))
        assert wait_for(lambda: len(workers_of(b)) == 2), descendants(b.proc.pid)
        yield b
        stop_broker(b)


def test_workers_answer_the_hot_request_protected_and_a_marked_socket_clear(tb, wbroker):
    """The hot request is answered by the workers (their CPU, not the main process's), truthfully:
    a protected socket's bytes leave as ESP (captured: no plaintext), a bypass-marked socket of
    the same flow's peer is answered clear and its bytes are captured in clear."""
    from .wire import capture, seen

    tb.up("brkw1", "rawkey", 4)
    with tb.in_netns(tb.b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tb.in_netns(tb.a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        marked = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c = wbroker.client()
    with rx, tx, marked:
        rx.bind((str(tb.b.v4), 28101))
        tx.connect((str(tb.b.v4), 28101))
        marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
        marked.connect((str(tb.b.v4), 28101))
        workers = workers_of(wbroker)
        before = {p: cpu_seconds(p) for p in [wbroker.proc.pid, *workers]}
        answers = [c.get_socket_ptoken(tx) for _ in range(800)]  # within the quota's burst (1,000)
        after = {p: cpu_seconds(p) for p in before}
        with capture(tb.b.netns, tb.b.link) as frames:
            tx.send(b"WORKER-SA-PROTECTED")
            marked.send(b"WORKER-MARKED-LEAK")
        clear = c.get_socket_ptoken(marked)
    c.close()
    assert all(t.protected for t in answers) and "b-brkw1-v4@btns.test" in answers[0].itoken.audit_string
    assert not seen(frames, b"WORKER-SA-PROTECTED")  # it left as ESP
    assert seen(frames, b"WORKER-MARKED-LEAK")  # it left in clear ...
    assert not clear.protected and "mark=0x42" in clear.information_string, clear.information_string  # ... said so
    spent = {p: after[p] - before[p] for p in before}
    worker_cpu = sum(spent[p] for p in workers)
    assert worker_cpu > 5 * spent[wbroker.proc.pid], spent  # the workers did the answering


def test_forwarded_requests_demand_and_latch_with_pushed_notification(tb, wbroker):
    """Through a worker's forwarding: set_socket_ptoken, the attached demand of an unconnected
    socket (a hot request the worker hands on), hello, latch and watch; a terminate breaks the
    latch and the main process pushes latch-broken on the watching connection."""
    from btns_vici.backend import SAEvent
    from btns_vici.latch import LatchBroken, latch, unlatch
    from btns_vici.sockets import socket_key

    c = wbroker.client()
    demand = PToken()
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    with tb.in_netns(tb.a):
        unconnected = socket.socket()
    with unconnected:
        c.set_socket_ptoken(unconnected, demand)
        attached = c.request("get_socket_ptoken", unconnected)  # the exact hot bytes: forwarded by the worker
        assert attached.get("attached") is True
        assert protocol.ptoken_from_wire(attached["ptoken"], trusted=True).privacy_protected == Setting.LEVEL_MEDIUM
    assert c.hello()["server"] == "btnsd"
    tb.up("brkw2", "psk", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28102)
    notes: list[SAEvent] = []
    stop_watch = c.watch(notes.append)
    broken: list[LatchBroken] = []
    try:
        lt = latch(cli, c, on_break=broken.append)
        assert lt.latched.protected
        t0 = time.monotonic()
        tb.terminate("brkw2")
        assert wait_for(lambda: broken, timeout=5, step=0.01), (
            "the latch did not break: " + wbroker.log.read_text()[-2000:]
        )
        assert any(n.kind == "latch-broken" and n.raw.get("key") == list(socket_key(cli)) for n in notes), notes
        print(f"latch broken {1000 * (time.monotonic() - t0):.0f} ms after terminate returned")
        unlatch(cli)
    finally:
        stop_watch()
        cli.close()
        srv.close()
        c.close()


def test_a_dead_client_s_connection_is_unloaded(tb, wbroker):
    """A client (its own process, read by a worker) has btnsd load a responder connection
    (prepare_listen), then is killed -9: the worker sees the EOF, tells the main process, which
    unloads the connection from charon."""
    from btns_vici.hostkey import load_or_create

    work = wbroker.conf.parent  # B's host key is A's peer key (the operator's one-time exchange)
    (work / "peers-a" / "b.pem").write_bytes(load_or_create(str(work / "keys-b")).public_pem)
    code = f"""
        import os, socket, sys, time
        from btns_vici import PToken, Setting
        from btns_vici.broker.client import BrokerClient
        c = BrokerClient({wbroker.path!r})
        p = PToken(); p.privacy_protected = Setting.LEVEL_MEDIUM
        s = socket.socket()
        c.set_socket_ptoken(s, p)
        s.bind(({str(tb.a.v4)!r}, 28103))
        print(c.request("prepare_listen", s, timeout=30)["serving"], flush=True)
        time.sleep(60)
    """
    proc = subprocess.Popen(
        ["ip", "netns", "exec", tb.a.netns, sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name, "prepare_listen did not answer: " + wbroker.log.read_text()[-2000:]
        loaded = [n for entry in tb.a.ctl.list_conns() for n in entry]
        assert name in loaded, loaded
        proc.kill()
    finally:
        proc.wait(10)
    gone = wait_for(lambda: name not in [n for entry in tb.a.ctl.list_conns() for n in entry], timeout=10)
    assert gone, f"{name} is still loaded after its client died"


def test_kill_9_of_a_worker_existing_and_new_clients_keep_being_answered(tb, wbroker):
    tb.up("brkw4", "rawkey", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28104)
    with cli, srv:
        clients = [BrokerClient(wbroker.path, timeout=2) for _ in range(8)]  # spread over both workers
        for c in clients:
            assert c.get_socket_ptoken(cli).protected
        victims = workers_of(wbroker)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        time.sleep(0.3)
        # Every existing client keeps getting (true) answers: the main process took the dead
        # worker's over. At most one answer in flight at the kill may be lost: ETIMEDOUT, never wrong.
        for c in clients:
            for _ in range(20):
                try:
                    assert c.get_socket_ptoken(cli).protected
                except OSError as exc:
                    assert exc.errno == errno.ETIMEDOUT, exc
        fresh = [BrokerClient(wbroker.path, timeout=2) for _ in range(4)]
        for c in fresh:
            assert c.get_socket_ptoken(cli).protected
        # A new worker replaced the dead one (for new clients).
        assert wait_for(lambda: len(workers_of(wbroker)) == 2 and victims[0] not in workers_of(wbroker), timeout=5)
        later = BrokerClient(wbroker.path, timeout=2)
        assert later.get_socket_ptoken(cli).protected
        for c in [*clients, *fresh, later]:
            c.close()
    assert f"worker {victims[0]} died" in wbroker.log.read_text()


def test_no_descriptor_leaks_in_the_main_process_after_200_clients(tb, wbroker):
    tb.up("brkw5", "rawkey", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28105)
    time.sleep(0.3)
    procs = [wbroker.proc.pid, *workers_of(wbroker)]
    before = {p: len(os.listdir(f"/proc/{p}/fd")) for p in procs}
    with cli, srv:
        for _ in range(4):
            batch = [_raw(wbroker.path) for _ in range(50)]
            for i, s in enumerate(batch):
                assert _ask(s, protocol.request("get_socket_ptoken", i + 1), [cli.fileno()])["ok"] is True
                assert _ask(s, protocol.request("hello", i + 1000))["ok"] is True  # forwarded
            for s in batch:
                s.close()
    settled = wait_for(
        lambda: all(len(os.listdir(f"/proc/{p}/fd")) <= before[p] + 1 for p in procs),
        timeout=5,
    )
    assert settled, {p: (before[p], len(os.listdir(f"/proc/{p}/fd"))) for p in procs}


def test_sigterm_to_the_main_process_stops_every_worker(tb, testbed, tmp_path: Path):
    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    b = start_broker(testbed, tmp_path, args=("--workers", "3"))
    try:
        assert wait_for(lambda: len(workers_of(b)) == 3)
        c = b.client()
        assert c.hello()["server"] == "btnsd"
        family = descendants(b.proc.pid)
        assert sorted(family.values()) == ["btnsd-worker"] * 3 + ["btnsd-zygote"], family
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
        left = wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in family), timeout=5)
        assert left, {p: os.path.exists(f"/proc/{p}") for p in family}
        c.close()
    finally:
        stop_broker(b)


def _alive(pid: int) -> bool:
    try:
        return _ppid_comm(pid)[2] != "Z"
    except (OSError, IndexError, ValueError):
        return False


def test_workers_1_is_one_process_doing_everything(tb, testbed, tmp_path: Path):
    """``--workers 1``: no zygote, no worker; the main process reads and answers every client."""
    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    b = start_broker(testbed, tmp_path, args=("--workers", "1"))
    try:
        tb.up("brkw7", "rawkey", 4)
        cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28107)
        c = b.client()
        with cli, srv, socket.socket() as unconnected:
            assert c.get_socket_ptoken(cli).protected
            with pytest.raises(OSError) as e:
                c.get_socket_ptoken(unconnected)
            assert e.value.errno == errno.ENOTCONN
        assert c.hello()["server"] == "btnsd"
        assert descendants(b.proc.pid) == {}
        c.close()
    finally:
        stop_broker(b)


def test_the_main_process_s_metrics_count_what_the_workers_answered(tb, testbed, tmp_path: Path):
    """Workers tally their answers and send them to the main process every second: the scrape
    counts every hot query the workers answered, with its latency histogram."""
    import re
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for side in ("a", "b"):
        (tmp_path / f"peers-{side}").mkdir()
    b = start_broker(testbed, tmp_path, args=("--workers", "2", "--metrics", f"127.0.0.1:{port}"))
    try:
        tb.up("brkw8", "rawkey", 4)
        cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=28108)
        clients = [b.client() for _ in range(4)]  # on both workers
        with cli, srv:
            for c in clients:
                for _ in range(50):
                    assert c.get_socket_ptoken(cli).protected
        assert len(workers_of(b)) == 2

        def scraped() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {
                name: float(v)
                for name, v in re.findall(r'^(btnsd_\w+(?:\{[^}]*op="get_socket_ptoken"[^}]*\})?) (\S+)$', text, re.M)
            }

        def counted() -> dict[str, float] | None:
            got = scraped()
            ok = got.get('btnsd_queries_total{answer="ok",op="get_socket_ptoken"}', 0)
            return got if ok >= 200 else None

        got = wait_for(counted, timeout=5, step=0.2)
        assert got, scraped()
        assert got['btnsd_queries_total{answer="ok",op="get_socket_ptoken"}'] == 200
        assert got['btnsd_request_seconds_count{op="get_socket_ptoken"}'] == 200
        assert got["btnsd_workers"] == 2
        for c in clients:
            c.close()
    finally:
        stop_broker(b)
