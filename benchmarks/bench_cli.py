"""`btns sockets` against `ss -tanp`, `btns sas` against `swanctl --list-sas`, side by side (root needed).

    .venv/bin/python benchmarks/bench_cli.py [--sockets 10,10000] [--sas 1,1000] [--runs 7] [--btns PATH]
                                             [--before PATH]   # e.g. an older checkout's btns, same runs

On the host testbed (two namespaces, one charon each, btns_lab.testbed):

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

from btns_lab.testbed import Testbed


def wall(cmd: list[str], runs: int) -> float | None:
    """Median wall time (ms) of running ``cmd`` to completion, output discarded; None when this btns
    does not know the options (exit 2: an older version, for before/after tables)."""
    samples = []
    warm = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if warm.returncode == 2:
        return None
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
    ap.add_argument("--before", help="another btns to time in the same runs (a 'before' column)")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("ss", "swanctl", "nsenter"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    rows: list[tuple[str, str, float | None, float | None, float]] = []

    def both(prefix: list[str], rest: list[str]) -> tuple[float | None, float | None]:
        """(btns, before) for `btns GLOBALS REST` run under ``prefix``."""
        mine = wall([*prefix, args.btns, *globals_, *rest], args.runs)
        old = wall([*prefix, args.before, *globals_, *rest], args.runs) if args.before else None
        return mine, old

    with Testbed(loglevel=-1) as tb:
        ns = ["nsenter", f"--net=/run/netns/{tb.a.netns}"]
        globals_ = ["--backend", "strongswan", "--vici-socket", tb.a.vici_path]
        tb.up("bench", "rawkey")
        held = protected_pair(tb)
        for n in (int(x) for x in args.sockets.split(",")):
            sockets = loopback_sockets(tb, n)
            ss = wall([*ns, "ss", "-tanp"], args.runs)
            for what, rest in (
                ("btns sockets", ["sockets"]),
                ("btns sockets --json", ["--json", "sockets"]),
                ("btns sockets -t state established", ["sockets", "-t", "state", "established"]),
            ):
                rows.append((f"sockets, {n:,}", what, *both(ns, rest), ss))
            for s in sockets:
                s.close()
        for s in held:
            s.close()
        tb.unload_conn("bench")
        for n in (int(x) for x in args.sas.split(",")):
            name = f"bsas{n}"
            bring_up(tb, name, n)
            swanctl = wall(["swanctl", "--list-sas", "--uri", f"unix://{tb.a.vici_path}"], args.runs)
            for what, rest in (
                ("btns sas", ["sas"]),
                ("btns sas --json", ["--json", "sas"]),
                ("btns sas --ike NAME", ["sas", "--ike", name]),
            ):
                rows.append((f"sas, {n:,} CHILD_SAs", what, *both([], rest), swanctl))
            tb.unload_conn(name)
    print(f"median of {args.runs} runs, whole processes, ms; load average {os.getloadavg()[0]:.1f}")
    print()
    before = "| before ms " if args.before else ""
    print(f"| scenario | btns command {before}| btns ms | reference | reference ms | btns/reference |")
    print("|---|---" + ("|---" if args.before else "") + "|---|---|---|---|")

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f}"

    for scenario, what, mine, old, ref in rows:
        reference = "ss -tanp" if scenario.startswith("sockets") else "swanctl --list-sas"
        ratio = "-" if mine is None else f"{mine / ref:.1f}x"
        col = f"| {ms(old)} " if args.before else ""
        print(f"| {scenario} | `{what}` {col}| {ms(mine)} | `{reference}` | {ms(ref)} | {ratio} |")


if __name__ == "__main__":
    main()
