"""First query in a fresh process and down-detection latency, by number of CHILD_SAs (root needed).

    .venv/bin/python benchmarks/bench_daemon_edge.py [--sizes 1,1000,10000] [--downs 20]

N CHILD_SAs on the host testbed in connections of at most 2,500 per-port children (charon
refuses a load-conn of about 2,700), each connection its own IKE_SA: child i protects TCP to
B's port 20000+i. Then:

* ``first query, cold``: a new Python process answers ``find_sa`` for one flow (the last child's;
  time of that call alone, median of 3 processes, the shared coverage cache removed before each:
  whatever index it needs is built in it, and it writes the cache);
* ``first query, cached``: the same with the coverage cache a previous process wrote
  (:mod:`btns_vici.strongswan.coverage`; median of 3 processes, each asking another child's flow
  than the one that wrote it: the candidates come from the cache, the answer from charon);
* ``naive``: the same with ``index=list`` (one unfiltered list-sas + list-conns + list-certs,
  what every query cost before the index; above ~1,950 children per IKE_SA charon drops
  the message and the flow is NOT FOUND);
* ``floor``: what any fresh answer needs from charon: the IKE_SA skeleton (list-sas of
  every IKE_SA without children) and the one CHILD_SA by name (list-sas ike-id + child);
* ``configs``: list-conns of the connections with an IKE_SA (how a process that does not
  know which child config could cover the flow finds out: charon's only selector source);
* ``down detection``: with a warm index, a CHILD_SA is terminated (blocking VICI terminate);
  the time from terminate's return until ``find_sa`` answers None (median / max of ``--downs``).

Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from btns_lab.testbed import Testbed
from btns_vici.core.selectors import Flow
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.strongswan.session import ViciSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_socket_ptoken import BASE_PORT

#: Children per connection (one IKE_SA each): under charon's load-conn limit of about 2,700.
PER_CONN = 2500

FRESH = """
import json, socket, sys, time, ipaddress
from btns_vici.plugins import get_backend
from btns_vici.core.selectors import Flow
opts, a, b, port, mode = json.loads(sys.argv[1])
be = get_backend("strongswan", {**opts, "timeout": "30", **({"index": "list"} if mode == "list" else {})})
flow = Flow(socket.IPPROTO_TCP, ipaddress.ip_address(a), 40000, ipaddress.ip_address(b), port)
t = time.perf_counter()
found = be.find_sa(flow)
print(json.dumps([(time.perf_counter() - t) * 1000, found is not None]))
"""


def first_query(
    tb: Testbed, port: int, mode: str = "events", cache: str | None = None, ports: list[int] | None = None
) -> tuple[float, bool]:
    """Median ms of 3 fresh processes; with ``cache`` (a directory) that cache is kept between
    them, else a fresh empty one each time. ``ports``: a flow per process (default ``port``)."""
    runs = []
    for i in range(3):
        scratch = None
        if cache is None:
            scratch = cache_dir = tempfile.mkdtemp(prefix="btns-bench-cache-")
        else:
            cache_dir = cache
        env = {**os.environ, "BTNS_CACHE_DIR": cache_dir}
        arg = json.dumps([tb.a.options, str(tb.a.v4), str(tb.b.v4), ports[i] if ports else port, mode])
        out = subprocess.run([sys.executable, "-c", FRESH, arg], capture_output=True, text=True, env=env)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if out.returncode != 0:
            runs.append([float("nan"), False])
            continue
        runs.append(json.loads(out.stdout))
    return statistics.median(r[0] for r in runs), all(r[1] for r in runs)


def conn_names(n: int, tag: str) -> list[tuple[str, int, int]]:
    """(connection name, first child index, children) covering children 0..n-1."""
    return [(f"{tag}{n}-{k}", first, min(PER_CONN, n - first)) for k, first in enumerate(range(0, n, PER_CONN))]


def bring_up_conns(tb: Testbed, n: int, tag: str) -> float:
    """Load and initiate every connection's children, one connection after the other (thousands of
    queued initiates on several IKE_SAs at once stall charon's job queue); seconds in all."""
    a, b = tb.a.v4, tb.b.v4
    ctl = tb.a.ctl
    t = time.monotonic()
    s = ViciSession(tb.a.vici_path, 30)
    try:
        for name, first, count in conn_names(n, tag):
            children = {
                f"c{i}": ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{BASE_PORT + i}]"]) for i in range(first, first + count)
            }
            tb.load_conn(name, "psk", 4, children=children)
            tb.initiate(name, f"c{first}")
            for i in range(first + 1, first + count):
                for _ in ctl.initiate({"ike": name, "child": f"c{i}", "timeout": "-1"}):
                    pass
            deadline = time.monotonic() + 300
            last = f"c{first + count - 1}"
            while not any(
                c.get("state") == b"INSTALLED"
                for e in s.list_sas(ike=name, child=last)
                for c in e[name].get("child-sas", {}).values()
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}/{last} did not come up")
                time.sleep(0.2)
            print(f"#   {name}: {count} children up at {time.monotonic() - t:.1f} s", flush=True)
    finally:
        s.close()
    return time.monotonic() - t


def floor_and_configs(tb: Testbed, n: int, tag: str) -> tuple[float, float]:
    """(skeleton + the one child by name, list-conns of every connection) in ms, median of 3."""
    floors, configs = [], []
    name, first, count = conn_names(n, tag)[-1]
    for _ in range(3):
        s = ViciSession(tb.a.vici_path, 30)
        t = time.perf_counter()
        skeleton = s.list_sas(child="#btns-vici:no-child#")
        uid = next(e[name]["uniqueid"].decode() for e in skeleton if name in e)
        assert s.list_sas(ike_id=uid, child=f"c{first + count - 1}")
        floors.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for cname, _, _ in conn_names(n, tag):
            s.list_conns(cname)
        configs.append((time.perf_counter() - t) * 1000)
        s.close()
    return statistics.median(floors), statistics.median(configs)


def down_detection(tb: Testbed, n: int, tag: str, downs: int) -> list[float]:
    opts = {**tb.a.options, "timeout": "30"}
    be = get_backend("strongswan", opts)
    out = []
    step = max(1, n // downs)
    # warm: the first answer, then the background warming it starts (a second read of each
    # configuration among it, so that no negative answer re-reads one on its path)
    assert be.find_sa(Flow(socket.IPPROTO_TCP, tb.a.v4, 40000, tb.b.v4, BASE_PORT)) is not None
    get_plugin_manager().get_plugin("strongswan").context(opts).index.warmed(30)
    for i in list(range(0, n, step))[:downs]:
        name = f"{tag}{n}-{i // PER_CONN}"
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
    ap.add_argument("--sizes", default="1,1000,10000")
    ap.add_argument("--downs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    with Testbed() as tb:
        for n in (int(x) for x in args.sizes.split(",")):
            tag = "edge"
            setup = bring_up_conns(tb, n, tag)
            print(f"# {n}: up in {setup:.1f} s", flush=True)
            port = BASE_PORT + n - 1
            fq, ok = first_query(tb, port)
            cache = tempfile.mkdtemp(prefix="btns-bench-cache-")
            try:
                first_query(tb, BASE_PORT, cache=cache)  # writes the cache (one more cold process)
                others = [BASE_PORT + max(0, n - 1 - k * max(1, n // 3)) for k in range(3)]
                cq, cok = first_query(tb, port, cache=cache, ports=others)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            naive, nok = first_query(tb, port, "list")
            floor, configs = floor_and_configs(tb, n, tag)
            downs = down_detection(tb, n, tag, min(args.downs, n))
            rows.append((n, fq, ok, cq, cok, naive, nok, floor, configs, statistics.median(downs), max(downs)))
            print(f"# {n}: {rows[-1]}", flush=True)
            get_plugin_manager().get_plugin("strongswan").forget({**tb.a.options, "timeout": "30"})
            for name, _, _ in conn_names(n, tag):
                tb.unload_conn(name)
    print(
        "| CHILD_SAs (IKE_SAs) | first query, fresh process, cold (ms) | first query, coverage cache (ms) "
        "| naive: index=list (ms) | floor: skeleton + that child (ms) | list-conns of every connection (ms) "
        "| down detection p50 (ms) | max (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, fq, ok, cq, cok, naive, nok, floor, configs, p50, mx in rows:
        ikes = len(conn_names(n, "x"))
        print(
            f"| {n:,} ({ikes}) | {fq:.1f}{'' if ok else ' (NOT FOUND)'} | {cq:.1f}{'' if cok else ' (NOT FOUND)'} "
            f"| {naive:.1f}{'' if nok else ' (NOT FOUND)'} "
            f"| {floor:.1f} | {configs:.1f} | {p50:.2f} | {mx:.2f} |"
        )


if __name__ == "__main__":
    main()
