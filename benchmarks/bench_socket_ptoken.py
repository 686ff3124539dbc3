"""get_socket_pToken latency with 1, 100 and 1,000 CHILD_SAs on the host testbed (root needed).

    .venv/bin/python benchmarks/bench_socket_ptoken.py [--sizes 1,100,1000] [--queries 2000]

One connection with N children, child i protecting TCP to B's port 20000+i (so the
1,000 SAs are distinct and a socket is covered by exactly one). The first child is
initiated blocking, the others asynchronously (``"timeout": "-1"``). Then, for a
sample of connected sockets, it times:

* ``index``   get_socket_pToken with the event-fed SA index (the default backend): the
              socket-exact answer (namespace, device, mark, uid, kernel route, inbound);
* ``flow``    ptoken_for_flow on the same flows: judged as a bare flow, the naive way
              (what get_socket_pToken did before "socket-exact truth");
* ``floor``   reading the socket alone (sockets.inspect: fstat, getpeername, getsockopts,
              SIOCGSKNS), the cost no answer about a socket can avoid;
* ``lookup``  Backend.find_protection alone (index lookup + data-plane proof, no token);
* ``relist``  get_socket_pToken re-listing every SA per query (list-sas/-conns/-certs);
* ``swanctl`` running ``swanctl --list-sas`` once (what a shell script would do).
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable

from btns_lab.testbed import Testbed
from btns_vici.api import get_socket_ptoken, ptoken_for_flow
from btns_vici.backend import Backend
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.sockets import flow_of, inspect

BASE_PORT = 20000


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def bring_up(tb: Testbed, name: str, n: int) -> float:
    """One PSK connection with ``n`` per-port children, all initiated; seconds until the last is installed.

    Only the last child is listed while waiting: an unfiltered list-sas of a big IKE_SA would exceed
    charon's 512 KiB message limit.
    """
    a, b = tb.a.v4, tb.b.v4
    children = {f"c{i}": ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{BASE_PORT + i}]"]) for i in range(n)}
    tb.load_conn(name, "psk", 4, children=children)
    t = time.monotonic()
    tb.initiate(name, "c0")
    ctl = tb.a.ctl
    for i in range(1, n):
        for _ in ctl.initiate({"ike": name, "child": f"c{i}", "timeout": "-1"}):
            pass
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        last = list(ctl.list_sas({"ike": name, "child": f"c{n - 1}"}))
        if any(c.get("state") == b"INSTALLED" for e in last for c in e[name].get("child-sas", {}).values()):
            return time.monotonic() - t
        time.sleep(0.2)
    raise RuntimeError(f"CHILD_SA c{n - 1} did not come up")


def sockets_for(tb: Testbed, n: int, k: int) -> list[socket.socket]:
    """k connected TCP sockets in A, spread over the N protected ports."""
    out = []
    step = max(1, n // k)
    for i in list(range(0, n, step))[:k]:
        with tb.in_netns(tb.b):
            srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((str(tb.b.v4), BASE_PORT + i))
        srv.listen(1)
        with tb.in_netns(tb.a):
            cli = socket.socket()
        cli.settimeout(10)
        cli.connect((str(tb.b.v4), BASE_PORT + i))
        conn, _ = srv.accept()
        srv.close()
        conn.close()
        out.append(cli)
    return out


def measure(tb: Testbed, events: Backend, relist: Backend, n: int, q: int, k: int) -> list[tuple]:
    """Bring up n CHILD_SAs, time every method, tear them down; one row per method."""
    name = f"bench{n}"
    setup = bring_up(tb, name, n)
    socks = sockets_for(tb, n, min(k, n))
    for s in socks:  # warm up and check every socket is protected, each by its own CHILD_SA
        tok = get_socket_ptoken(s, events)
        assert tok.protected and tok.policy_name.startswith(f"{name}/c"), tok.information_string
    flows = [flow_of(s) for s in socks]
    counter = itertools.count()

    def pick() -> int:
        return next(counter) % len(socks)

    slow_q = max(20, min(200, q // (10 if n < 1000 else 40)))
    swanctl = ["swanctl", "--list-sas", "--uri", f"unix://{tb.a.vici_path}"]
    index = get_plugin_manager().get_plugin("strongswan").context(events.options).index
    gen = index.generation
    results = {
        "index": timed(lambda: get_socket_ptoken(socks[pick()], events), q),
        "flow": timed(lambda: ptoken_for_flow(flows[pick()], events), q),
        "floor": timed(lambda: inspect(socks[pick()]), q),
        "lookup": timed(lambda: events.find_protection(flows[pick()]), q),
        "relist": timed(lambda: get_socket_ptoken(socks[pick()], relist), slow_q),
        "swanctl": timed(lambda: subprocess.run(swanctl, capture_output=True, check=True), max(10, slow_q // 4)),
    }
    changes = index.generation - gen
    print(f"# {n} CHILD_SAs up in {setup:.2f} s; index changes while timing: {changes}", flush=True)
    for s in socks:
        s.close()
    tb.unload_conn(name)
    return [
        (n, m, len(v), percentile(v, 0.5), percentile(v, 0.99), statistics.mean(v), best_batch_p50(v))
        for m, v in results.items()
    ]


def best_batch_p50(samples: list[float], batches: int = 5) -> float:
    """The lowest median of ``batches`` consecutive slices: the cost with the least CPU contention."""
    size = max(1, len(samples) // batches)
    return min(statistics.median(samples[i : i + size]) for i in range(0, len(samples) - size + 1, size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--sockets", type=int, default=20)
    args = ap.parse_args()
    rows = []
    with Testbed(loglevel=-1) as tb:
        events = get_backend("strongswan", tb.a.options)
        relist = get_backend("strongswan", {**tb.a.options, "index": "list"})
        for n in (int(x) for x in args.sizes.split(",")):
            rows.extend(measure(tb, events, relist, n, args.queries, args.sockets))
        plugin = get_plugin_manager().get_plugin("strongswan")
        plugin.forget(tb.a.options)
        plugin.forget(relist.options)
    print()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    head = ("CHILD_SAs", "method", "queries", "p50 us", "p99 us", "mean us", "best-batch p50")
    print(f"{head[0]:>9} | {head[1]:<8} | {head[2]:>7} | {head[3]:>10} | {head[4]:>10} | {head[5]:>10} | {head[6]:>14}")
    print(f"{'-' * 9}-|-{'-' * 8}-|-{'-' * 7}-|-{'-' * 10}-|-{'-' * 10}-|-{'-' * 10}-|-{'-' * 14}")
    for n, method, cnt, p50, p99, mean, best in rows:
        print(f"{n:>9} | {method:<8} | {cnt:>7} | {p50:>10.1f} | {p99:>10.1f} | {mean:>10.1f} | {best:>14.1f}")


if __name__ == "__main__":
    main()
