"""`btns sockets` against `ss -tanp`, `btns sas` against `swanctl --list-sas`, side by side (root needed).

    .venv/bin/python benchmarks/bench_cli.py [--sockets 10,10000] [--sas 1,1000] [--runs 7] [--btns PATH]
                                             [--before PATH]   # e.g. an older checkout's btns, same runs

On the host testbed (two namespaces, one charon each, btns_lab.testbed); every btns command
names the backend (``--backend strongswan``) except the rows "(no --backend)", the default
selection an operator gets when typing just ``btns sas``:

* sockets: N sockets in namespace A (N/2 TCP connections over A's loopback, all clear) plus one
  protected TCP connection A->B; both tools run under ``nsenter --net=/run/netns/A``, btns with
  A's VICI socket (table output, and --json);
* sas: one connection with N CHILD_SAs (per-port children, as bench_socket_ptoken.py); btns
  and swanctl both ask A's charon.

Each command runs --runs times; the table shows the median wall time of whole processes
(start-up included: that is what an operator waits for), their median CPU time (user+sys: less
disturbed than wall time on a loaded machine), btns/reference and the target (3x ss, 2x swanctl).
The floor is printed first: the interpreter's start (``python -I -c pass``) and ``import vici``
(every strongSwan command imports it), beside the references' own start. Python writes its
bytecode caches as an installed wheel has them (PYTHONDONTWRITEBYTECODE is dropped for the runs;
the untimed warm-up run of each command writes them).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socket_ptoken import BASE_PORT, bring_up

from btns_lab.testbed import Testbed

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
#: the shared coverage cache (btns sas reads the connections' auth rounds there once one run wrote
#: them: what an operator's second command gets) lives in a directory removed afterwards
_CACHE = tempfile.TemporaryDirectory(prefix="btns-bench-cache-")
ENV["BTNS_CACHE_DIR"] = _CACHE.name


def timed(cmd: list[str], runs: int, any_exit: bool = False) -> tuple[float, float] | None:
    """Median (wall ms, CPU ms) of running ``cmd`` to completion, output discarded; None when this
    btns does not know the options (exit 2: an older version, for before/after tables).
    ``any_exit``: the exit code does not matter (start-up floors such as ``swanctl --version``)."""
    walls, cpus = [], []
    warm = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=ENV)
    if warm.returncode == 2 and not any_exit:
        return None
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        err = proc.stderr.read() if proc.stderr else b""
        _pid, status, usage = os.wait4(proc.pid, 0)
        walls.append((time.perf_counter() - t) * 1000)
        cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stderr:
            proc.stderr.close()
        if proc.returncode != 0 and not any_exit:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-500:]}")
    return statistics.median(walls), statistics.median(cpus)


def wall(cmd: list[str], runs: int) -> float | None:
    """Median wall time (ms) of ``cmd`` (see :func:`timed`)."""
    got = timed(cmd, runs)
    return None if got is None else got[0]


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
    rows: list[tuple[str, str, float | None, tuple[float, float] | None, float]] = []

    def both(prefix: list[str], rest: list[str]) -> tuple[tuple[float, float] | None, float | None]:
        """((btns wall, cpu), before wall) for `btns GLOBALS REST` run under ``prefix``; a REST that
        starts with "default" runs without --backend (the default selection, what an operator types)."""
        chosen = globals_
        if rest[:1] == ["default"]:
            chosen, rest = globals_[2:], rest[1:]
        mine = timed([*prefix, args.btns, *chosen, *rest], args.runs)
        old = wall([*prefix, args.before, *chosen, *rest], args.runs) if args.before else None
        return mine, old

    python = str(Path(args.btns).with_name("python"))
    floor = [
        ("`python -I -c pass` (the interpreter starts)", timed([python, "-I", "-c", "pass"], args.runs)),
        ("`python -c 'import vici'` (start + strongSwan's client)", timed([python, "-c", "import vici"], args.runs)),
        ("`btns --version` (start + the entry module)", timed([args.btns, "--version"], args.runs)),
        ("`ss -V` (ss starts)", timed(["ss", "-V"], args.runs, any_exit=True)),
        ("`swanctl --version` (swanctl starts)", timed(["swanctl", "--version"], args.runs, any_exit=True)),
    ]

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
                ("btns sockets (no --backend)", ["default", "sockets"]),
                ("btns sockets --json", ["--json", "sockets"]),
                ("btns sockets -t state established", ["sockets", "-t", "state", "established"]),
            ):
                mine, old = both(ns, rest)
                rows.append((f"sockets, {n:,}", what, old, mine, ss))
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
                ("btns sas (no --backend)", ["default", "sas"]),
                ("btns sas --json", ["--json", "sas"]),
                ("btns sas --ike NAME", ["sas", "--ike", name]),
            ):
                mine, old = both([], rest)
                rows.append((f"sas, {n:,} CHILD_SAs", what, old, mine, swanctl))
            tb.unload_conn(name)
    print(f"median of {args.runs} runs, whole processes, ms; load average {os.getloadavg()[0]:.1f}")
    print()

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f}"

    print("| floor | wall ms | CPU ms |")
    print("|---|---|---|")
    for what, got in floor:
        print(f"| {what} | {ms(got[0] if got else None)} | {ms(got[1] if got else None)} |")
    print()
    before = "| before ms " if args.before else ""
    head = "| btns ms | btns CPU ms | reference | reference ms | btns/reference | target |"
    print(f"| scenario | btns command {before}{head}")
    print("|---|---" + ("|---" if args.before else "") + "|---|---|---|---|---|---|")
    for scenario, what, old, mine, ref in rows:
        sockets = scenario.startswith("sockets")
        reference = "ss -tanp" if sockets else "swanctl --list-sas"
        limit = 3 if sockets else 2
        ratio = "-" if mine is None else f"{mine[0] / ref:.1f}x"
        col = f"| {ms(old)} " if args.before else ""
        w, c = mine if mine is not None else (None, None)
        cells = f"| {ms(w)} | {ms(c)} | `{reference}` | {ms(ref)} | {ratio} | {limit}x = {ms(limit * ref)} |"
        print(f"| {scenario} | `{what}` {col}{cells}")


if __name__ == "__main__":
    main()
