"""btnsd against in-process answers on the host testbed (root needed); prints, never asserts.

    .venv/bin/python benchmarks/bench_broker.py [--sizes 1,1000] [--queries 2000]
    .venv/bin/python benchmarks/bench_broker.py --sizes 10000   (bring-up alone takes minutes)

Side by side in one run:

* ``in-process``   get_socket_ptoken with the backend in this process (the floor the broker adds to);
* ``broker``       the same socket through btnsd (one client, warm);
* ``fresh client`` a new process's first answer through btnsd (the broker's index is already warm:
                   the point of one index per host), vs a fresh process building its own index
                   (modules imported before the clock starts);
* queries/s        with 1, 16 and 256 concurrent clients (processes), each on its own socket;
* btnsd CPU        btnsd's own CPU time (user + system, /proc/PID/stat) per query while 16 clients
                   ran: what the machine's load cannot inflate, unlike the rates;
* RSS              btnsd's resident memory per CHILD_SA and per connected client.

CHILD_SAs are per-port children of connections of at most 2,500 each (bench_daemon_edge.py's
bring-up), the measured socket is the first child's.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from btns_lab.testbed import Testbed, connected_pair
from btns_vici.api import get_socket_ptoken
from btns_vici.broker.client import BrokerClient
from btns_vici.plugins import get_backend

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_daemon_edge import bring_up_conns, conn_names  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


FRESH = """
import os, socket, sys, time
fd = int(sys.argv[1])
from btns_vici.api import get_socket_ptoken  # the interpreter's imports are not the answer's cost
import btns_vici.broker.client, btns_vici.plugins, btns_vici.strongswan.plugin, btns_vici.latch
t0 = time.perf_counter()
{setup}
tok = get_socket_ptoken(fd{arg})
print((time.perf_counter() - t0) * 1e6, tok.protected)
"""

LOAD = """
import socket, sys, time
from btns_vici.broker.client import BrokerClient
fd, path, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
c = BrokerClient(path)
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    c.get_socket_ptoken(fd)
    n += 1
print(n)
"""


def fresh(fd: int, setup: str, arg: str) -> float:
    code = FRESH.format(setup=setup, arg=arg)
    out = subprocess.run(
        [sys.executable, "-c", code, str(fd)], pass_fds=(fd,), capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,1000")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rows = []
    with Testbed(loglevel=-1) as tb, tempfile.TemporaryDirectory(prefix="btns-bench-") as work:
        conf = Path(work) / "btnsd.toml"
        conf.write_text(
            f'[quota]\nrequests_per_second = 1e9\nburst = 1000000\n[[backend]]\nname = "strongswan"\n'
            f'vici_socket = "{tb.a.vici_path}"\nnetns = "{tb.a.netns}"\n'
        )
        path = str(Path(work) / "btnsd.sock")
        brk = subprocess.Popen([sys.executable, "-m", "btns_vici.broker", "--socket", path, "--config", str(conf)])
        while not (os.path.exists(path) and BrokerClient(path, timeout=1).probe()):
            time.sleep(0.05)
        be = get_backend("strongswan", tb.a.options)
        client = BrokerClient(path)
        rss_empty = rss_kib(brk.pid)
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"# {n}: up in {bring_up_conns(tb, n, 'bb'):.1f} s", flush=True)
            cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=20000)
            get_socket_ptoken(cli, be)
            client.get_socket_ptoken(cli)
            inproc = timed(lambda s=cli: get_socket_ptoken(s, be), args.queries)
            brok = timed(lambda s=cli: client.get_socket_ptoken(s), args.queries)
            f_broker = statistics.median(
                fresh(cli.fileno(), f"os.environ['BTNS_BROKER'] = {path!r}", "") for _ in range(5)
            )
            opts = repr(dict(tb.a.options))
            own = f"from btns_vici.plugins import get_backend\nbe = get_backend('strongswan', {opts})"
            f_own = statistics.median(fresh(cli.fileno(), own, ", be") for _ in range(3))
            qps = {}
            cpu = 0.0
            for k in (1, 16, 256):
                c0 = cpu_seconds(brk.pid)
                procs = [
                    subprocess.Popen(
                        [sys.executable, "-c", LOAD, str(cli.fileno()), path, str(args.seconds)],
                        pass_fds=(cli.fileno(),),
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(k)
                ]
                total = sum(int(p.communicate()[0]) for p in procs)
                qps[k] = total / args.seconds
                if k == 16:
                    cpu = (cpu_seconds(brk.pid) - c0) / max(1, total) * 1e6
            rows.append((n, p50(inproc), p50(brok), f_broker / 1000, f_own / 1000, qps, rss_kib(brk.pid), cpu))
            print(f"# {n}: {rows[-1]}", flush=True)
            cli.close()
            srv.close()
            for name, _, _ in conn_names(n, "bb"):
                tb.unload_conn(name)
        extra = [BrokerClient(path) for _ in range(200)]
        for c in extra:
            c.hello()
        rss_clients = rss_kib(brk.pid)
        for c in extra:
            c.close()
        brk.terminate()
        brk.wait()
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(
        "| CHILD_SAs | in-process p50 µs | broker p50 µs | ratio | fresh client via broker ms | fresh process "
        "own index ms | q/s 1 client | q/s 16 | q/s 256 | btnsd CPU µs/query (16 clients) | btnsd RSS KiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, a, b, fb, fo, q, rss, cpu in rows:
        print(
            f"| {n:,} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {fb:.1f} | {fo:.1f} | {q[1]:,.0f} | {q[16]:,.0f} | "
            f"{q[256]:,.0f} | {cpu:.0f} | {rss:,} |"
        )
    print(f"\nbtnsd RSS: {rss_empty:,} KiB at start; {(rss_clients - rows[-1][6]) / 200:.1f} KiB per connected client")


if __name__ == "__main__":
    main()
