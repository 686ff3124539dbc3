"""What confirming every CHILD_SA's selectors costs a listing (``btns sas``, ``btns sockets``) (root needed).

    .venv/bin/python benchmarks/bench_confirmed_listing.py [--sizes 1,1000] [--runs 7]

charon formats traffic selectors with the non-reentrant getprotobynumber()/getservbyport(): a
listing made while another VICI client lists may name another valid protocol or port. So
:func:`btns_vici.strongswan.listing.list_records` rests each CHILD_SA's selectors on two agreeing
listings (:func:`~btns_vici.strongswan.listing.confirmed_sas`). Side by side, in-process, median of
``--runs`` (the coverage cache warm, as after the first ``btns sas``):

* ``floor``: one list-sas (decoded only): what any listing of charon's SAs costs;
* ``naive``: ``list_records`` with one list-sas, believed as read (what it did before);
* ``confirmed``: ``list_records`` now (a CHILD_SA whose child config repeats its selectors is
  confirmed by that read; the others by a second list-sas);
* ``swanctl``: ``swanctl --list-sas`` (a whole process), the reference of ``btns sas``.

Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

from btns_lab.testbed import Testbed
from btns_vici.strongswan import listing, parse
from btns_vici.strongswan.session import ViciSession

BASE_PORT = 32000


def _up(tb: Testbed, name: str, n: int) -> None:
    """n per-port children (``[tcp/PORT]``: names looked up, read twice), or with n = 0 one
    host-to-host child (bare addresses: nothing looked up, read once)."""
    a, b = tb.a.v4, tb.b.v4
    children = {f"c{i}": ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{BASE_PORT + i}]"]) for i in range(n)}
    if n == 0:
        children, n = {"c0": ([f"{a}/32"], [f"{b}/32"])}, 1
    tb.load_conn(name, "psk", 4, children=children)
    tb.initiate(name, "c0")
    for i in range(1, n):
        for _ in tb.a.ctl.initiate({"ike": name, "child": f"c{i}", "timeout": "-1"}):
            pass
    s = ViciSession(tb.a.vici_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = s.list_sas(ike=name)
        kids = [c for e in got for c in e[name].get("child-sas", {}).values() if c.get("state") == b"INSTALLED"]
        if len(kids) == n:
            break
        time.sleep(0.2)
    s.close()


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _once(
    session: ViciSession, first: list[tuple[str, Any]] | None = None, agrees: Any = None, **filters: str | None
) -> tuple[list[tuple[str, Any]], dict[str, dict[str, Any]]]:
    """confirmed_sas as list_records read before: one list-sas (the one already made), believed."""
    sas = (
        first if first is not None else [parse.single_section(e, "list-sas entry") for e in session.list_sas(**filters)]
    )
    return sas, {parse.uniqueid(sec): parse.children_of(sec) for _name, sec in sas}


def _naive(s: ViciSession) -> None:
    """list_records with one read (the code before): swaps confirmed_sas for :func:`_once`."""
    confirmed = listing.confirmed_sas
    listing.confirmed_sas = _once  # type: ignore[assignment]
    try:
        listing.list_records(s)
    finally:
        listing.confirmed_sas = confirmed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0,1,1000", help="CHILD_SAs per run; 0: one host-to-host child")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="btns-bench-") as d, Testbed() as tb:
        os.environ["BTNS_CACHE_DIR"] = os.path.join(d, "cache")
        swanctl = ["swanctl", "--list-sas", "--uri", f"unix://{tb.a.vici_path}"]
        for n in (int(x) for x in args.sizes.split(",")):
            name = f"bench{n}"
            _up(tb, name, n)
            s = ViciSession(tb.a.vici_path, timeout=30)
            try:
                listing.list_records(s)  # writes the coverage cache
                floor = _median_ms(s.list_sas, args.runs)
                naive = _median_ms(functools.partial(_naive, s), args.runs)
                confirmed = _median_ms(functools.partial(listing.list_records, s), args.runs)
                ref = _median_ms(lambda: subprocess.run(swanctl, capture_output=True, check=True), args.runs)
            finally:
                s.close()
                tb.unload_conn(name)
            rows.append((n, floor, naive, confirmed, ref))
    print(
        "| CHILD_SAs | floor: one list-sas (ms) | naive: one listing believed (ms)"
        " | confirmed: list_records (ms) | swanctl --list-sas (ms) |"
    )
    print("|---|---|---|---|---|")
    for n, floor, naive, confirmed, ref in rows:
        what = "1 host-to-host" if n == 0 else f"{n:,} per-port"
        print(f"| {what} | {floor:.1f} | {naive:.1f} | {confirmed:.1f} | {ref:.1f} |")


if __name__ == "__main__":
    main()
