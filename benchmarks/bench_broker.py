"""btnsd against in-process answers on the host testbed (root needed); prints, never asserts.

    .venv/bin/python benchmarks/bench_broker.py [--sizes 1,1000] [--workers 1,2,4] [--queries 2000]
    .venv/bin/python benchmarks/bench_broker.py --sizes 10000   (bring-up alone takes minutes)

Side by side in one run, for each ``btnsd --workers N`` (1: one process, as before workers):

* ``in-process``   get_socket_ptoken with the backend in this process (the floor the broker adds to);
* ``broker``       the same socket through btnsd (one client, warm), in slices alternating with
                   the in-process ones (both meet the same moments of the shared machine);
* ``fresh client`` a new process's first answer through btnsd (the broker's index is already warm:
                   the point of one index per host), vs a fresh process building its own index
                   (modules imported before the clock starts);
* queries/s        with 1, 16 and 256 concurrent clients (processes), each on its own connection,
                   asking about the same socket: Python clients (BrokerClient) and C clients
                   (``benchmarks/loadgen.c``, compiled with cc: the protocol from the README alone,
                   ~10 µs of CPU a query, so the clients are not what is measured; the median
                   of --repeat runs, default 3);
* btnsd CPU        btnsd's own CPU time (main process, zygote and workers: user + system from
                   /proc/PID/stat) per query while 16 C clients ran, split into user and kernel:
                   less inflated by other users' load than the rates; and the clients' CPU
                   per query (getrusage of the finished client processes) for both kinds;
* interleaved      q/s from 16 C clients for every --workers value with all brokers up at once, in
                   --rounds rounds that visit each in turn (so each meets the same moments of a
                   shared machine): the fairest comparison of the worker counts;
* memory           btnsd's proportional set size (PSS, all its processes) per CHILD_SA and per
                   connected client.

CHILD_SAs are per-port children of connections of at most 2,500 each (bench_daemon_edge.py's
bring-up), the measured socket is the first child's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
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


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (btnsd's zygote and workers)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of ``pids`` together."""
    user = system = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
        system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rss_kib(pids: list[int]) -> int:
    """The proportional set size (PSS: shared pages split between the processes sharing them, so
    the zygote's and the workers' copy-on-write pages are not counted once per process) of ``pids``."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total


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


def loadgen_binary(work: str) -> str:
    """benchmarks/loadgen.c compiled with the system's C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench_broker: a C compiler (cc) is needed for the C clients")
    out = str(Path(work) / "loadgen")
    subprocess.run([cc, "-O2", "-o", out, str(HERE / "loadgen.c")], check=True)
    return out


def python_load(fd: int, path: str, k: int, seconds: float) -> int:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, str(fd), path, str(seconds)],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(k)
    ]
    return sum(int(p.communicate()[0]) for p in procs)


def c_load(binary: str, fd: int, path: str, k: int, seconds: float) -> int:
    out = subprocess.run(
        [binary, path, str(fd), str(k), str(seconds)], pass_fds=(fd,), capture_output=True, text=True, check=False
    )
    fields = dict(kv.split("=", 1) for kv in out.stdout.split())
    if out.returncode != 0:
        print(f"# loadgen: {out.stdout.strip()} {out.stderr.strip()}", flush=True)
    return int(fields.get("ok", 0))


def start_broker(path: str, conf: Path, workers: int) -> subprocess.Popen[bytes]:
    brk = subprocess.Popen(
        [sys.executable, "-m", "btns_vici.broker", "--socket", path, "--config", str(conf), "--workers", str(workers)]
    )
    while not (os.path.exists(path) and BrokerClient(path, timeout=1).probe()):
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while workers > 1 and len(family(brk.pid)) < workers + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # main, zygote and the workers
    return brk


def interleave(
    conf: Path, work: str, binary: str, cli: socket.socket, counts: list[int], args: argparse.Namespace
) -> dict[int, list[float]]:
    """q/s from 16 C clients for every --workers value, in rounds that visit each broker in turn."""
    brokers = {w: start_broker(str(Path(work) / f"i{w}.sock"), conf, w) for w in counts}
    runs: dict[int, list[float]] = {w: [] for w in counts}
    try:
        for w in counts:
            BrokerClient(str(Path(work) / f"i{w}.sock")).get_socket_ptoken(cli)  # warm
        for _ in range(args.rounds):
            for w in counts:
                time.sleep(0.5)
                runs[w].append(c_load(binary, cli.fileno(), str(Path(work) / f"i{w}.sock"), 16, 2.0) / 2.0)
    finally:
        for brk in brokers.values():
            brk.terminate()
            brk.wait()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,1000")
    ap.add_argument("--workers", default="1,2,4", help="btnsd --workers values to compare")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per C-client measurement (the median is printed)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds comparing the --workers values (0: none)")
    args = ap.parse_args()
    rows = []
    per_client = {}
    interleaved: dict[int, list[float]] = {}
    with Testbed(loglevel=-1) as tb, tempfile.TemporaryDirectory(prefix="btns-bench-") as work:
        conf = Path(work) / "btnsd.toml"
        conf.write_text(
            f'[quota]\nrequests_per_second = 1e9\nburst = 1000000\n[[backend]]\nname = "strongswan"\n'
            f'vici_socket = "{tb.a.vici_path}"\nnetns = "{tb.a.netns}"\n'
        )
        binary = loadgen_binary(work)
        path = str(Path(work) / "btnsd.sock")
        be = get_backend("strongswan", tb.a.options)
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"# {n}: up in {bring_up_conns(tb, n, 'bb'):.1f} s", flush=True)
            cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4, port=20000)
            get_socket_ptoken(cli, be)
            for w in (int(x) for x in args.workers.split(",")):
                brk = start_broker(path, conf, w)
                pids = family(brk.pid)
                rss_empty = rss_kib(pids)
                client = BrokerClient(path)
                client.get_socket_ptoken(cli)
                # in-process and through btnsd in alternating slices: the same moments of the machine
                inproc: list[float] = []
                brok: list[float] = []
                for _ in range(10):
                    inproc += timed(lambda s=cli: get_socket_ptoken(s, be), args.queries // 10)
                    brok += timed(lambda s=cli, c=client: c.get_socket_ptoken(s), args.queries // 10)
                f_broker = statistics.median(
                    fresh(cli.fileno(), f"os.environ['BTNS_BROKER'] = {path!r}", "") for _ in range(5)
                )
                opts = repr(dict(tb.a.options))
                own = f"from btns_vici.plugins import get_backend\nbe = get_backend('strongswan', {opts})"
                f_own = statistics.median(fresh(cli.fileno(), own, ", be") for _ in range(3))
                qps: dict[tuple[str, int], float] = {}
                cpu = (0.0, 0.0)
                client_cpu: dict[str, float] = {}
                for kind in ("c", "py"):  # C first: 256 Python processes leave the machine loaded for a while
                    for k in (1, 16, 256):
                        # C clients: the median of --repeat runs (the machine is shared: one run can
                        # meet another user's burst); Python clients: one run (256 interpreters).
                        runs = []
                        for _ in range(args.repeat if kind == "c" else 1):
                            time.sleep(1.0)
                            c0, r0 = cpu_split(pids), children_cpu()
                            if kind == "py":
                                total = python_load(cli.fileno(), path, k, args.seconds)
                            else:
                                total = c_load(binary, cli.fileno(), path, k, args.seconds)
                            c1, r1 = cpu_split(pids), children_cpu()
                            n_ = max(1, total)
                            runs.append(
                                (total, (c1[0] - c0[0]) / n_ * 1e6, (c1[1] - c0[1]) / n_ * 1e6, (r1 - r0) / n_ * 1e6)
                            )
                        total, user, system, clients = sorted(runs)[len(runs) // 2]
                        qps[kind, k] = total / args.seconds
                        if k == 16:
                            client_cpu[kind] = clients
                            if kind == "c":
                                cpu = (user, system)
                load = os.getloadavg()[0]
                rss = rss_kib(pids)
                rows.append(
                    (w, n, p50(inproc), p50(brok), f_broker / 1000, f_own / 1000, qps, cpu, client_cpu, rss, load)
                )
                print(f"# {n} SAs, {w} workers: {rows[-1]}", flush=True)
                if n == int(args.sizes.split(",")[-1]):
                    extra = [BrokerClient(path) for _ in range(200)]
                    for c in extra:
                        c.hello()
                    per_client[w] = (rss_empty, (rss_kib(pids) - rows[-1][9]) / 200)
                    for c in extra:
                        c.close()
                client.close()
                brk.terminate()
                brk.wait()
            if n == int(args.sizes.split(",")[-1]) and args.rounds:
                interleaved = interleave(conf, work, binary, cli, [int(x) for x in args.workers.split(",")], args)
            cli.close()
            srv.close()
            for name, _, _ in conn_names(n, "bb"):
                tb.unload_conn(name)
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(
        "| workers | CHILD_SAs | in-process p50 µs | broker p50 µs | ratio | fresh client via broker ms | fresh "
        "process own index ms | q/s Python 1 / 16 / 256 clients | q/s C 1 / 16 / 256 clients | btnsd CPU "
        "µs/query user+kernel (16 C clients) | client CPU µs/query Python / C (16) | btnsd PSS KiB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w, n, a, b, fb, fo, q, cpu, ccpu, rss, load in rows:
        print(
            f"| {w} | {n:,} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {fb:.1f} | {fo:.1f} | "
            f"{q['py', 1]:,.0f} / {q['py', 16]:,.0f} / {q['py', 256]:,.0f} | "
            f"{q['c', 1]:,.0f} / {q['c', 16]:,.0f} / {q['c', 256]:,.0f} | "
            f"{cpu[0] + cpu[1]:.0f} = {cpu[0]:.0f} + {cpu[1]:.0f} | {ccpu['py']:.0f} / {ccpu['c']:.0f} | {rss:,} | "
            f"{load:.1f} |"
        )
    if args.rounds:
        print(
            f"\nInterleaved (all brokers up at once, {args.rounds} rounds, each round every broker in turn: "
            f"the same moments of the shared machine): q/s from 16 C clients, {args.sizes.split(',')[-1]} CHILD_SAs"
        )
        for w, runs in interleaved.items():
            each = ", ".join(f"{r:,.0f}" for r in runs)
            print(f"btnsd --workers {w}: median {statistics.median(runs):,.0f} (runs: {each})")
    for w, (empty, each) in per_client.items():
        print(f"btnsd --workers {w} PSS: {empty:,} KiB at start (all processes); {each:.1f} KiB per connected client")


if __name__ == "__main__":
    main()
