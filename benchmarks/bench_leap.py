"""Time to first protected byte: never-seen peer (leap of faith) vs known vs pinned vs raw VICI (root).

    .venv/bin/python benchmarks/bench_leap.py [--rounds 10]

On the host testbed (kernel-libipsec), A connects a TCP socket to B and sends one byte; the clock
runs from just before A's ``set_socket_ptoken``/``connect`` (or the VICI calls) until B's accepted
socket has received that byte. Between rounds every IKE_SA is torn down (outside the clock).

* ``never seen``: both known-peers stores forgotten: key exchange (HELLO/COOKIE/KEYREQ/KEY, B's
  learner loads its per-peer connection), then IKE with the learned keys; reported BTNS;
* ``known (stored key)``: the stores hold the keys: the exchange re-checks the key, then IKE;
  reported LEAPOFFAITH;
* ``pinned iToken``: the demand pins B's key (no exchange); B's per-peer connection is loaded;
* ``raw VICI, configured keys`` (the naive way, keys exchanged out of band): no btns_vici on A's
  path: ``load-conn`` + ``initiate`` over VICI with both keys configured beforehand (B's connection
  preloaded), then a plain ``connect``;
* ``floor: SA already up``: the same plain ``connect`` + byte through an installed SA (no IKE at all).

Prints a table (median, min, max in ms); asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.integration is a package

from tests.integration.test_leap_testbed import PORT, LeapSide

import btns_vici
from btns_lab.testbed import Testbed
from btns_vici import AuthMethod, IToken, PToken, Setting, leap
from btns_vici.api import accept, connect, listen
from btns_vici.latch import unlatch
from btns_vici.leap.responder import Limits
from btns_vici.strongswan.conns import conn_config

TCP_PORT = 27001


def demand(pin: IToken | None = None) -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.integrity_protected = Setting.ENABLE
    t = IToken() if pin is None else IToken.from_bytes(pin.to_bytes())  # a saved iToken: peer pinning
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    t.set_auth_method(AuthMethod.LEAPOFFAITH, Setting.ENABLE)
    p.itoken = t
    return p


def teardown(tb: Testbed, keep_b: tuple[str, ...] = ("btns-resp-", "btns-leap-")) -> None:
    for p in tb.peers:
        for conn in list(p.ctl.list_conns()):
            for name in conn:
                with contextlib.suppress(Exception):
                    for _ in p.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
                        pass
                if p is tb.b and name.startswith(keep_b):
                    continue
                if name.startswith("btns-") or name.startswith("bench-"):
                    with contextlib.suppress(Exception):
                        p.ctl.unload_conn({"name": name})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with Testbed() as tb, tempfile.TemporaryDirectory() as tmp:
        tb.allow_leap(PORT)  # the inbound filter lets the learners' udp/5386 in
        a, b = LeapSide(tb, tb.a, Path(tmp)), LeapSide(tb, tb.b, Path(tmp))
        a.learner()
        b.learner(Limits(keyreq_rate=100, keyreq_burst=100))  # 3 contacts a round: above the default 10/s
        srv = b.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        btns_vici.set_socket_ptoken(srv, demand(), b.backend)
        srv.bind(("0.0.0.0", TCP_PORT))
        listen(srv, 16, b.backend)
        plain = b.socket()
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        plain.bind(("0.0.0.0", TCP_PORT + 1))
        plain.listen(16)
        arrived: list[float] = []

        def server(s: socket.socket, held: bool) -> None:
            while True:
                try:
                    conn, _ = accept(s, b.backend) if held else s.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(1)
                    arrived.append(time.perf_counter())
                    if held:
                        unlatch(conn)

        threading.Thread(target=server, args=(srv, True), daemon=True).start()
        threading.Thread(target=server, args=(plain, False), daemon=True).start()

        saved: list[IToken] = []

        def one(label: str, pin: IToken | None = None, forget: bool = False) -> None:
            if forget:
                a.store.forget(b.peer.v4)
                b.store.forget(a.peer.v4)
            arrived.clear()
            leap.forget_recent()  # measure the exchange every time
            cli = a.socket()
            t0 = time.perf_counter()
            btns_vici.set_socket_ptoken(cli, demand(pin), a.backend)
            connect(cli, (str(b.peer.v4), TCP_PORT), a.backend)
            cli.sendall(b"x")
            while not arrived:
                time.sleep(0.0002)
            results.setdefault(label, []).append((arrived[0] - t0) * 1000)
            pa = btns_vici.get_socket_ptoken(cli, a.backend)
            saved[:] = [pa.itoken]
            results.setdefault(label + " method", []).append(pa.itoken.authentication_method.name)  # type: ignore[arg-type]
            unlatch(cli)
            cli.close()
            teardown(tb)

        for _ in range(args.rounds):
            one("never seen (leap of faith, first contact)", forget=True)
            one("known (stored key, exchange + IKE)")
            one("pinned iToken (no exchange)", pin=saved[0])
        # raw VICI with configured keys (an operator connection for A on B: the learner now refuses A)
        from btns_vici.plugins import get_plugin_manager

        ctx_a = get_plugin_manager().get_plugin("strongswan").context(a.options)
        ctx_b = get_plugin_manager().get_plugin("strongswan").context(b.options)
        la, lb = ipaddress.ip_address(str(a.peer.v4)), ipaddress.ip_address(str(b.peer.v4))
        ctx_b.session.request("load-key", {"type": "any", "data": b.host.private_pem.decode()})
        ctx_b.session.request(
            "load-conn", conn_config("bench-raw", lb, la, b.host, [a.host.public_der], PToken(), ctx_b.dataplane())
        )
        ctx_a.session.request("load-key", {"type": "any", "data": a.host.private_pem.decode()})
        for _ in range(args.rounds):
            arrived.clear()
            t0 = time.perf_counter()
            ctx_a.session.request(
                "load-conn", conn_config("bench-raw", la, lb, a.host, [b.host.public_der], PToken(), ctx_a.dataplane())
            )
            ctx_a.session.streamed(
                "initiate", "control-log", {"ike": "bench-raw", "child": "bench-raw", "timeout": "10000"}
            )
            cli = a.socket()
            cli.connect((str(b.peer.v4), TCP_PORT + 1))
            cli.sendall(b"x")
            while not arrived:
                time.sleep(0.0002)
            results.setdefault("raw VICI, configured keys", []).append((arrived[0] - t0) * 1000)
            cli.close()
            arrived.clear()
            t0 = time.perf_counter()
            cli = a.socket()
            cli.connect((str(b.peer.v4), TCP_PORT + 1))
            cli.sendall(b"x")
            while not arrived:
                time.sleep(0.0002)
            results.setdefault("floor: SA already up (plain connect)", []).append((arrived[0] - t0) * 1000)
            cli.close()
            teardown(tb, keep_b=("btns-resp-", "btns-leap-", "bench-raw"))
        srv.close()
        plain.close()
        a.close()
        b.close()
        tb.allow_leap(None)
    print(f"time to first protected byte, {args.rounds} rounds each (ms); learner udp/{PORT}")
    print(f"{'case':45} {'median':>8} {'min':>8} {'max':>8}  reported")
    for label, vals in results.items():
        if label.endswith(" method"):
            continue
        methods = sorted(set(results.get(label + " method", [])))
        med = statistics.median(vals)
        print(f"{label:45} {med:8.1f} {min(vals):8.1f} {max(vals):8.1f}  {','.join(methods) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
