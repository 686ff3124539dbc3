"""Attack: charon names ports with getservbyport() (not reentrant) and protocols with
getprotobynumber(): while another process lists, a listing may name another valid port
("ssh" for "http"). Children on well-known ports (names in /etc/services) beside unnamed
ports; every path that answers from charon's selectors must stay true meanwhile: the
``index=list`` lookup (``find_sa`` from a fresh listing), the listing of ``btns sas`` /
``btns sockets`` (``list_records``) and the ``btns sockets`` snapshot's coverage.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from btns_vici.core.selectors import Flow
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.strongswan.session import ViciSession

pytestmark = pytest.mark.testbed

#: Well-known ports with names in /etc/services (tcp and udp), then unnamed ones.
NAMED = (21, 22, 23, 25, 53, 80, 88, 110, 143, 443, 993, 995, 3306, 5432, 6379, 8080)
UNNAMED = tuple(range(31000, 31016))
PORTS = NAMED + UNNAMED
SECONDS = 8.0

_HAMMER = r"""
import sys, time
from btns_vici.strongswan.session import ViciSession
s, end = ViciSession(sys.argv[1], timeout=10), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.list_conns()
    s.list_sas(ike=sys.argv[3])
"""


def _bring_up(tb, name: str) -> dict[str, tuple[int, int]]:
    """One connection, a TCP and a UDP child per port: {child: (proto, port)}."""
    a, b = tb.a.v4, tb.b.v4
    children, want = {}, {}
    for port in PORTS:
        for proto, pname in ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp")):
            cname = f"{pname}{port}"
            children[cname] = ([f"{a}/32[{pname}]"], [f"{b}/32[{pname}/{port}]"])
            want[cname] = (proto, port)
    tb.load_conn(name, "psk", 4, children=children)
    first = next(iter(children))
    tb.initiate(name, first)
    for c in children:
        if c != first:
            for _ in tb.a.ctl.initiate({"ike": name, "child": c, "timeout": "-1"}):
                pass
    s = ViciSession(tb.a.vici_path)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            got = s.list_sas(ike=name)
            kids = [c for e in got for c in e[name].get("child-sas", {}).values()]
            up = {c.get("name") for c in kids if c.get("state") == b"INSTALLED"}
            if len(up) == len(children):
                return want
            time.sleep(0.2)
    finally:
        s.close()
    raise AssertionError("children not installed")


@pytest.fixture
def hammered(tb):
    name = "ports"
    want = _bring_up(tb, name)
    hammer = subprocess.Popen([sys.executable, "-c", _HAMMER, tb.a.vici_path, str(SECONDS + 30), name])
    try:
        yield name, want
    finally:
        hammer.kill()
        hammer.wait()
        tb.unload_conn(name)


def test_list_index_answers_stay_true_while_another_process_lists(tb, hammered):
    """``index=list``: find_sa from a listing made for this query; every answer names the flow's child."""
    _name, want = hammered
    a, b = tb.a.v4, tb.b.v4
    opts = {**tb.a.options, "timeout": "10", "index": "list"}
    plugin = get_plugin_manager().get_plugin("strongswan")
    be = get_backend("strongswan", opts)
    wrong, failed, answered = [], [], 0
    end = time.monotonic() + SECONDS
    try:
        while time.monotonic() < end:
            for cname, (proto, port) in want.items():
                try:
                    found = be.find_sa(Flow(proto, a, 40000, b, port))
                except OSError as exc:
                    failed.append((cname, repr(exc)))
                    continue
                answered += 1
                if found is None or found[1].name != cname:
                    wrong.append((cname, found[1].name if found else None))
    finally:
        plugin.forget(opts)
    print(f"{answered} answers, {len(wrong)} wrong, {len(failed)} failed")
    assert answered >= len(want) and not wrong and not failed, (wrong[:10], failed[:10])


def test_listing_selectors_stay_true_while_another_process_lists(tb, hammered):
    """``list_records`` (what ``btns sas`` shows and ``btns sockets`` judges coverage from):
    every child's selectors are the configured ones, and no listing fails."""
    from btns_vici.strongswan.listing import list_records

    name, want = hammered
    s = ViciSession(tb.a.vici_path, timeout=10)
    wrong, failed, rounds = [], [], 0
    end = time.monotonic() + SECONDS
    try:
        while time.monotonic() < end:
            rounds += 1
            try:
                sas = list_records(s, ike=name, cache=False)
            except OSError as exc:
                failed.append(repr(exc))
                continue
            for ike in sas:
                for child in ike.children:
                    proto, port = want[child.name]
                    (r,) = child.remote_ts
                    if (r.proto, r.port_lo, r.port_hi) != (proto, port, port):
                        wrong.append((child.name, str(r)))
    finally:
        s.close()
    print(f"{rounds} listings, {len(wrong)} wrong selectors, {len(failed)} failed")
    assert rounds and not wrong and not failed, (wrong[:10], failed[:10])


def test_children_on_ports_with_hyphenated_names_are_found(tb):
    """charon names 8080 ``http-alt`` and 6001 ``x11-1`` (getservbyport): one port each, not the
    ranges "http".."alt" (EPROTO) or "x11"..1 (reversed: port 0); both the event-fed index and
    ``index=list`` find them, and a neighbouring port stays uncovered."""
    name = "hyphen"
    a, b = tb.a.v4, tb.b.v4
    ports = {"alt": 8080, "x11": 6001, "zope": 8021, "plain": 31100}
    children = {c: ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{p}]"]) for c, p in ports.items()}
    tb.load_conn(name, "psk", 4, children=children)
    for c in children:
        tb.initiate(name, c)
    listed = ViciSession(tb.a.vici_path).list_sas(ike=name)
    printed = {c["name"].decode(): c["remote-ts"][0].decode() for e in listed for c in e[name]["child-sas"].values()}
    assert printed["alt"].endswith("[tcp/http-alt]") and printed["x11"].endswith("[tcp/x11-1]"), printed
    plugin = get_plugin_manager().get_plugin("strongswan")
    try:
        for mode in ("events", "list"):
            opts = {**tb.a.options, "index": mode}
            be = get_backend("strongswan", opts)
            try:
                for cname, port in ports.items():
                    found = be.find_sa(Flow(socket.IPPROTO_TCP, a, 40000, b, port))
                    assert found is not None and found[1].name == cname, (mode, cname, found)
                    assert be.find_sa(Flow(socket.IPPROTO_TCP, a, 40000, b, port + 1)) is None
            finally:
                plugin.forget(opts)
    finally:
        tb.unload_conn(name)
