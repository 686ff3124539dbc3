"""First query in a fresh process and down-detection latency, by number of CHILD_SAs (root needed).

    .venv/bin/python benchmarks/bench_daemon_edge.py [--sizes 1,1000,2500] [--downs 20]

One connection with N children on the host testbed (child i protects TCP to B's port
20000+i), as in bench_socket_ptoken.py. Then:

* ``first query``: a new Python process builds its SA index and answers ``find_sa`` for one
  flow (time of that call alone, median of 3 processes; the index build is in it);
* ``down detection``: with a warm index, a CHILD_SA is terminated (blocking VICI terminate);
  the time from terminate's return until ``find_sa`` answers None (median / max of ``--downs``).

Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from btns_lab.testbed import Testbed
from btns_vici.core.selectors import Flow
from btns_vici.plugins import get_backend, get_plugin_manager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_socket_ptoken import BASE_PORT, bring_up

FRESH = """
import json, socket, sys, time, ipaddress
from btns_vici.plugins import get_backend
from btns_vici.core.selectors import Flow
opts, a, b, port = json.loads(sys.argv[1])
be = get_backend("strongswan", opts)
flow = Flow(socket.IPPROTO_TCP, ipaddress.ip_address(a), 40000, ipaddress.ip_address(b), port)
t = time.perf_counter()
found = be.find_sa(flow)
print(json.dumps([(time.perf_counter() - t) * 1000, found is not None]))
"""


def first_query(tb: Testbed, port: int) -> tuple[float, bool]:
    runs = []
    for _ in range(3):
        arg = json.dumps([tb.a.options, str(tb.a.v4), str(tb.b.v4), port])
        out = subprocess.run([sys.executable, "-c", FRESH, arg], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return statistics.median(r[0] for r in runs), all(r[1] for r in runs)


def down_detection(tb: Testbed, name: str, n: int, downs: int) -> list[float]:
    be = get_backend("strongswan", tb.a.options)
    out = []
    step = max(1, n // downs)
    for i in list(range(0, n, step))[:downs]:
        flow = Flow(socket.IPPROTO_TCP, tb.a.v4, 40000, tb.b.v4, BASE_PORT + i)
        found = be.find_sa(flow)
        assert found is not None, f"c{i} not up"
        cid = found[1].uniqueid
        for _ in tb.a.ctl.terminate({"ike": name, "child-id": cid, "timeout": "5000"}):
            pass
        t = time.perf_counter()
        while be.find_sa(flow) is not None:
            if time.perf_counter() - t > 5:
                raise RuntimeError("child loss not detected within 5 s")
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,1000")
    ap.add_argument("--downs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    with Testbed() as tb:
        for n in (int(x) for x in args.sizes.split(",")):
            name = f"edge{n}"
            setup = bring_up(tb, name, n)
            fq, ok = first_query(tb, BASE_PORT + n - 1)
            downs = down_detection(tb, name, n, min(args.downs, n))
            rows.append((n, setup, fq, ok, statistics.median(downs), max(downs)))
            print(f"# {n}: up in {setup:.1f} s", flush=True)
            get_plugin_manager().get_plugin("strongswan").forget(tb.a.options)
            tb.unload_conn(name)
    print("| CHILD_SAs (one IKE_SA) | first query, fresh process (ms) | down detection p50 (ms) | max (ms) |")
    print("|---|---|---|---|")
    for n, _setup, fq, ok, p50, mx in rows:
        print(f"| {n:,} | {fq:.1f}{'' if ok else ' (NOT FOUND)'} | {p50:.2f} | {mx:.2f} |")


if __name__ == "__main__":
    main()
