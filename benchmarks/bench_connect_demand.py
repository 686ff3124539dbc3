"""connect -> established with a demanded pToken (issue 16), on the host testbed (root):

* raw VICI: load-conn + initiate of a raw-key connection, then a plain TCP connect;
* the Python wrapper, cold: set_socket_ptoken + btns_vici.connect with no SA up (the IKE_SA is
  terminated before each round), verification and latch included;
* the Python wrapper, warm: the SA is already up (the operator-SA / existing-SA path);
* plain connect over the same SA, for reference.

Acquire-driven negotiation (a plain connect(2) answered from the kernel's ACQUIRE) is not built
yet, so it is not measured. Usage: ``python benchmarks/bench_connect_demand.py [ROUNDS]``.
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import btns_vici
from btns_lab.testbed import Testbed
from btns_vici import AuthMethod, IToken, PToken, Setting
from btns_vici.api import connect
from btns_vici.core.selectors import Flow
from btns_vici.hostkey import load_or_create
from btns_vici.latch import unlatch
from btns_vici.plugins import get_backend


def demand() -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    return p


def main(rounds: int) -> None:
    with Testbed() as tb, tempfile.TemporaryDirectory(prefix="btns-bench-") as tmp:
        root = Path(tmp)
        ka, kb = load_or_create(root / "a-keys"), load_or_create(root / "b-keys")
        (root / "a-peers").mkdir()
        (root / "b-peers").mkdir()
        (root / "a-peers" / "b.pem").write_bytes(kb.public_pem)
        (root / "b-peers" / "a.pem").write_bytes(ka.public_pem)
        oa = {**tb.a.options, "key_dir": str(root / "a-keys"), "peer_keys": str(root / "a-peers")}
        ob = {**tb.b.options, "key_dir": str(root / "b-keys"), "peer_keys": str(root / "b-peers")}
        be_a, be_b = get_backend("strongswan", oa), get_backend("strongswan", ob)
        be_b.serve(tb.b.v4, demand())
        with tb.in_netns(tb.b):
            srv = socket.socket()
        srv.bind((str(tb.b.v4), 0))
        srv.listen(256)
        port = srv.getsockname()[1]

        def acceptor() -> None:
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                c.close()

        threading.Thread(target=acceptor, daemon=True).start()

        def terminate_all() -> None:
            for name in [n for c in tb.a.ctl.list_conns() for n in c if n.startswith("btns-")]:
                for _ in tb.a.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
                    pass
            time.sleep(0.05)

        def sock() -> socket.socket:
            with tb.in_netns(tb.a):
                s = socket.socket()
            s.settimeout(10)
            return s

        raw, cold, warm, plain = [], [], [], []
        for _ in range(rounds):
            terminate_all()
            t0 = time.perf_counter()
            be_a.establish(Flow(6, tb.a.v4, 0, tb.b.v4, port), demand())
            with tb.in_netns(tb.a):
                s = socket.socket()
            s.bind(("0.0.0.0", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"ipsec0")
            s.connect((str(tb.b.v4), port))
            raw.append(time.perf_counter() - t0)
            s.close()

            terminate_all()
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
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"ipsec0")
            t0 = time.perf_counter()
            s.connect((str(tb.b.v4), port))
            plain.append(time.perf_counter() - t0)
            s.close()
        srv.close()
        for label, xs in (
            ("raw VICI load-conn+initiate, then connect", raw),
            ("wrapper, cold (set_socket_ptoken+connect+verify+latch)", cold),
            ("wrapper, warm (SA up)", warm),
            ("plain connect over the SA", plain),
        ):
            print(
                f"{label:58s} p50 {statistics.median(xs) * 1000:8.2f} ms  "
                f"max {max(xs) * 1000:8.2f} ms  ({len(xs)} runs; {1 / statistics.median(xs):7.1f}/s)"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
