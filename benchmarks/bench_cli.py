"""`btns sockets` against `ss -tanp`, `btns sas` against `swanctl --list-sas`, side by side (root needed).

    .venv/bin/python benchmarks/bench_cli.py [--sockets 10,10000] [--sas 1,1000] [--runs 7] [--btns PATH]

On the host testbed (two namespaces, one charon each, btns_vici.testbed):

* sockets: N sockets in namespace A (N/2 TCP connections over A's loopback, all clear) plus one
  protected TCP connection A->B; both tools run under ``nsenter --net=/run/netns/A``, btns with
  A's VICI socket (table output, and --json);
* sas: one connection with N CHILD_SAs (per-port children, as bench_socket_ptoken.py); btns
  and swanctl both ask A's charon.

Each command runs --runs times; the table shows the median wall time of whole processes
(start-up included: that is what an operator waits for) and btns/reference.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socket_ptoken import BASE_PORT, bring_up

from btns_vici.testbed import Testbed


def wall(cmd: list[str], runs: int) -> float:
    """Median wall time (ms) of running ``cmd`` to completion, output discarded."""
    samples = []
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)  # warm caches
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        samples.append((time.perf_counter() - t) * 1000)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return statistics.median(samples)


def loopback_sockets(tb: Testbed, n: int) -> list[socket.socket]:
    """About ``n`` sockets in A: n/2 connected TCP pairs over 127.0.0.1 (no SA covers them)."""
    out: list[socket.socket] = []
    with tb.in_netns(tb.a):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
        srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    out.append(srv)
    for _ in range(max(1, n // 2)):
        with tb.in_netns(tb.a):
            c = socket.socket()
        c.connect(srv.getsockname())
        out += [c, srv.accept()[0]]
    return out


def protected_pair(tb: Testbed) -> list[socket.socket]:
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.bind((str(tb.b.v4), BASE_PORT - 1))
    srv.listen(1)
    with tb.in_netns(tb.a):
        c = socket.socket()
    c.connect((str(tb.b.v4), BASE_PORT - 1))
    return [srv, c, srv.accept()[0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", default="10,10000")
    ap.add_argument("--sas", default="1,1000")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--btns", default=str(Path(sys.executable).with_name("btns")))
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("ss", "swanctl", "nsenter"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    rows: list[tuple[str, str, float, float]] = []
    with Testbed(loglevel=-1) as tb:
        ns = ["nsenter", f"--net=/run/netns/{tb.a.netns}"]
        btns = [args.btns, "--backend", "strongswan", "--vici-socket", tb.a.vici_path]
        tb.up("bench", "rawkey")
        held = protected_pair(tb)
        for n in (int(x) for x in args.sockets.split(",")):
            sockets = loopback_sockets(tb, n)
            ss = wall([*ns, "ss", "-tanp"], args.runs)
            rows.append((f"sockets, {n:,}", "btns sockets", wall([*ns, *btns, "sockets"], args.runs), ss))
            rows.append((f"sockets, {n:,}", "btns sockets --json", wall([*ns, *btns, "--json", "sockets"], args.runs),
                         ss))
            rows.append((f"sockets, {n:,}", "btns sockets -t state established",
                         wall([*ns, *btns, "sockets", "-t", "state", "established"], args.runs), ss))
            for s in sockets:
                s.close()
        for s in held:
            s.close()
        tb.unload_conn("bench")
        for n in (int(x) for x in args.sas.split(",")):
            name = f"bsas{n}"
            bring_up(tb, name, n)
            swanctl = wall(["swanctl", "--list-sas", "--uri", f"unix://{tb.a.vici_path}"], args.runs)
            rows.append((f"sas, {n:,} CHILD_SAs", "btns sas", wall([*btns, "sas"], args.runs), swanctl))
            rows.append((f"sas, {n:,} CHILD_SAs", "btns sas --json", wall([*btns, "--json", "sas"], args.runs),
                         swanctl))
            rows.append((f"sas, {n:,} CHILD_SAs", "btns sas --ike NAME", wall([*btns, "sas", "--ike", name],
                                                                             args.runs), swanctl))
            tb.unload_conn(name)
    print(f"median of {args.runs} runs, whole processes, ms; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| scenario | btns command | btns ms | reference | reference ms | ratio |")
    print("|---|---|---|---|---|---|")
    for scenario, what, mine, ref in rows:
        reference = "ss -tanp" if scenario.startswith("sockets") else "swanctl --list-sas"
        print(f"| {scenario} | `{what}` | {mine:,.0f} | `{reference}` | {ref:,.0f} | {mine / ref:.1f}x |")


if __name__ == "__main__":
    main()
