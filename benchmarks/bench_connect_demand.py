"""connect -> established with a demanded pToken (issue 16), side by side with the naive way and the floor.

Two places, because acquire-driven negotiation needs kernel ESP:

* ``--xfrm`` (kernel XFRM: inside the VM tier, ``scripts/vm/run.sh .venv/bin/python
  benchmarks/bench_connect_demand.py --xfrm``; two network namespaces, two charons with
  kernel-netlink, transport mode):

  - raw VICI: ``load-conn`` + ``initiate`` of the raw-key connection, then a plain connect;
  - acquire-driven: ``set_socket_ptoken`` then a PLAIN ``connect(2)``: the kernel's ACQUIRE is
    answered by the library's responder (btns_vici.acquire); the time of the connect call alone
    is printed too;
  - the Python wrapper: ``set_socket_ptoken`` + ``btns_vici.connect`` (negotiation, verify, latch);
  - warm (the SA is up): acquire-driven and wrapper, and a plain connect over the SA (the floor).

* default (root, the host testbed, kernel-libipsec): raw VICI, the wrapper cold and warm, plain.

Cold rounds terminate every IKE_SA first. Usage: ``python benchmarks/bench_connect_demand.py
[--xfrm] [ROUNDS]``.
"""

from __future__ import annotations

import ipaddress
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import btns_vici
from btns_vici import AuthMethod, IToken, PToken, Setting, lifecycle
from btns_vici.api import connect
from btns_vici.core.records import Protection
from btns_vici.core.selectors import Flow
from btns_vici.hostkey import load_or_create
from btns_vici.latch import latch, unlatch
from btns_vici.plugins import get_backend
from btns_vici.protection import require
from btns_vici.sockets import source_address, view_of


def demand(transport: bool = False) -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    if transport:
        p.tunnel_mode = Setting.DISABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    return p


def report(rows: list[tuple[str, list[float]]]) -> None:
    for label, xs in rows:
        if not xs:
            continue
        p50 = statistics.median(xs)
        print(f"{label:62s} p50 {p50 * 1000:8.2f} ms  max {max(xs) * 1000:8.2f} ms  ({len(xs)} runs; {1 / p50:7.1f}/s)")


def keys(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    ka, kb = load_or_create(root / "a-keys"), load_or_create(root / "b-keys")
    (root / "a-peers").mkdir()
    (root / "b-peers").mkdir()
    (root / "a-peers" / "b.pem").write_bytes(kb.public_pem)
    (root / "b-peers" / "a.pem").write_bytes(ka.public_pem)
    oa = {"key_dir": str(root / "a-keys"), "peer_keys": str(root / "a-peers")}
    ob = {"key_dir": str(root / "b-keys"), "peer_keys": str(root / "b-peers")}
    return oa, ob


def acceptor(srv: socket.socket) -> None:
    def run() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=run, daemon=True).start()


def terminate_all(session_of: Callable[[], object]) -> None:
    ses = session_of()
    for name in [n for c in ses.list_conns() for n in c if n.startswith("btns-")]:  # type: ignore[attr-defined]
        for _ in ses.terminate({"ike": name, "timeout": "3000"}):  # type: ignore[attr-defined]
            pass
    time.sleep(0.05)


def main_xfrm(rounds: int) -> None:
    root_dir = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root_dir))
    import subprocess

    from tests.integration.xfrm_support import socket_in
    from tests.vm.charon import PLUGINS, charon
    from tests.vm.netpair import A, B, two_hosts
    from tests.vm.test_enforce_xfrm_vm import load_esp_algorithms

    from btns_vici import acquire

    subprocess.run(["modprobe", "-a", "xfrm_user", "esp4", "veth"], check=True)
    with (
        tempfile.TemporaryDirectory(prefix="btns-bench-") as tmp,
        two_hosts() as (na, nb),
    ):
        work = Path(tmp)
        load_esp_algorithms(na)
        with charon(na, work / "ca", PLUGINS + " pkcs8") as ca, charon(nb, work / "cb", PLUGINS + " pkcs8") as cb:
            oa, ob = keys(work)
            oa.update(vici_socket=str(ca.vici_path), netns=na)
            ob.update(vici_socket=str(cb.vici_path), netns=nb)
            be_a, be_b = get_backend("strongswan", oa), get_backend("strongswan", ob)
            want = demand(transport=True)
            be_b.serve(B, want)
            srv = socket_in(nb, socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((str(B), 0))
            srv.listen(256)
            port = srv.getsockname()[1]
            acceptor(srv)

            def sock() -> socket.socket:
                s = socket_in(na, socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(20)
                return s

            raw, cold_acq, cold_acq_connect, cold_wrap = [], [], [], []
            warm_acq, warm_wrap, plain = [], [], []
            for _ in range(rounds):
                terminate_all(ca.session)
                t0 = time.perf_counter()
                be_a.establish(Flow(6, A, 0, B, port), want)
                s = sock()
                s.connect((str(B), port))
                raw.append(time.perf_counter() - t0)
                s.close()

                terminate_all(ca.session)
                s = sock()
                t0 = time.perf_counter()
                btns_vici.set_socket_ptoken(s, want, be_a)
                t1 = time.perf_counter()
                s.connect((str(B), port))  # plain: answered from the kernel's ACQUIRE
                t2 = time.perf_counter()
                cold_acq.append(t2 - t0)
                cold_acq_connect.append(t2 - t1)
                s.close()

                terminate_all(ca.session)
                s = sock()
                t0 = time.perf_counter()
                btns_vici.set_socket_ptoken(s, want, be_a)
                connect(s, (str(B), port), be_a)
                cold_wrap.append(time.perf_counter() - t0)
                unlatch(s)
                s.close()
            for _ in range(rounds * 5):
                s = sock()
                t0 = time.perf_counter()
                btns_vici.set_socket_ptoken(s, want, be_a)
                s.connect((str(B), port))
                warm_acq.append(time.perf_counter() - t0)
                s.close()
                s = sock()
                t0 = time.perf_counter()
                btns_vici.set_socket_ptoken(s, want, be_a)
                connect(s, (str(B), port), be_a)
                warm_wrap.append(time.perf_counter() - t0)
                unlatch(s)
                s.close()
                s = sock()
                t0 = time.perf_counter()
                s.connect((str(B), port))
                plain.append(time.perf_counter() - t0)
                s.close()
            srv.close()
            acquire.stop_all()
            report(
                [
                    ("kernel XFRM, cold: raw VICI load-conn+initiate, then connect", raw),
                    ("kernel XFRM, cold: set_socket_ptoken + PLAIN connect (ACQUIRE)", cold_acq),
                    ("   of which the connect(2) call alone", cold_acq_connect),
                    ("kernel XFRM, cold: wrapper (set+connect+verify+latch)", cold_wrap),
                    ("kernel XFRM, warm: set_socket_ptoken + PLAIN connect", warm_acq),
                    ("kernel XFRM, warm: wrapper", warm_wrap),
                    ("kernel XFRM: plain connect over the SA (floor)", plain),
                ]
            )
            r, c = statistics.median(raw), statistics.median(cold_acq)
            print(f"acquire-driven cold rate / raw VICI cold rate: {r / c * 100:.0f}% (target >= 80%)")


def main_testbed(rounds: int) -> None:
    from btns_lab.testbed import Testbed

    with Testbed() as tb, tempfile.TemporaryDirectory(prefix="btns-bench-") as tmp:
        oa, ob = keys(Path(tmp))
        be_a = get_backend("strongswan", {**tb.a.options, **oa})
        be_b = get_backend("strongswan", {**tb.b.options, **ob})
        be_b.serve(tb.b.v4, demand())
        with tb.in_netns(tb.b):
            srv = socket.socket()
        srv.bind((str(tb.b.v4), 0))
        srv.listen(256)
        port = srv.getsockname()[1]
        acceptor(srv)

        def sock() -> socket.socket:
            with tb.in_netns(tb.a):
                s = socket.socket()
            s.settimeout(10)
            return s

        def session():  # type: ignore[no-untyped-def]
            return tb.a.ctl

        def previous_path(s: socket.socket, address: tuple[str, int]) -> None:
            """The warm wrapper as it was before issue 16 item 7, from public pieces: the source
            address probed by a thread in the socket's namespace, the socket's keys read twice
            before connecting, and the latch verifying the socket a third time."""
            btns_vici.set_socket_ptoken(s, demand(), be_a)
            remote = ipaddress.ip_address(address[0])
            local = source_address(s, remote)
            prospective = Flow(6, local, 0, remote, address[1])
            existing = be_a.protect(view_of(s, prospective))
            assert isinstance(existing, Protection)
            lifecycle.own(be_a, existing.ike_sa.name, s)
            s.connect(address)
            require(demand(), view_of(s), be_a)
            latch(s, be_a, shutdown=True)

        raw, cold, warm, before, plain = [], [], [], [], []
        for _ in range(rounds):
            terminate_all(session)
            t0 = time.perf_counter()
            be_a.establish(Flow(6, tb.a.v4, 0, tb.b.v4, port), demand())
            s = sock()
            s.bind(("0.0.0.0", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"ipsec0")
            s.connect((str(tb.b.v4), port))
            raw.append(time.perf_counter() - t0)
            s.close()

            terminate_all(session)
            s = sock()
            t0 = time.perf_counter()
            btns_vici.set_socket_ptoken(s, demand(), be_a)
            connect(s, (str(tb.b.v4), port), be_a)
            cold.append(time.perf_counter() - t0)
            unlatch(s)
            s.close()
        for _ in range(rounds * 5):
            s = sock()
            t0 = time.perf_counter()
            btns_vici.set_socket_ptoken(s, demand(), be_a)
            connect(s, (str(tb.b.v4), port), be_a)
            warm.append(time.perf_counter() - t0)
            unlatch(s)
            s.close()
            s = sock()
            t0 = time.perf_counter()
            previous_path(s, (str(tb.b.v4), port))
            before.append(time.perf_counter() - t0)
            unlatch(s)
            s.close()
            s = sock()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"ipsec0")
            t0 = time.perf_counter()
            s.connect((str(tb.b.v4), port))
            plain.append(time.perf_counter() - t0)
            s.close()
        srv.close()
        report(
            [
                ("kernel-libipsec: raw VICI load-conn+initiate, then connect", raw),
                ("kernel-libipsec: wrapper, cold (set+connect+verify+latch)", cold),
                ("kernel-libipsec: wrapper, warm (SA up)", warm),
                ("kernel-libipsec: wrapper, warm, the previous path (naive)", before),
                ("kernel-libipsec: plain connect over the SA", plain),
            ]
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--xfrm"]
    n = int(args[0]) if args else 10
    if "--xfrm" in sys.argv[1:]:
        main_xfrm(n)
    else:
        main_testbed(n)
