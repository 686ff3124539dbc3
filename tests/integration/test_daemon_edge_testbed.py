"""The daemon edge against real charons (issue 13): a stopped charon times out within the
deadline, and one IKE_SA with more CHILD_SAs than charon can list in one message (its VICI
limit is 512 KiB, about 1,950 CHILD_SAs) is answered correctly from a fresh index.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time

import pytest

from btns_vici.core.errors import DaemonTimeoutError
from btns_vici.core.selectors import Flow
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.strongswan.session import ViciSession

pytestmark = pytest.mark.testbed

#: Over charon's per-message limit (~1,950 children), well under the suite's time budget (~6 s).
MANY = 2500
BASE_PORT = 30000


def test_stopped_charon_times_out_within_the_deadline(tb):
    """SIGSTOP: connect succeeds (the kernel queues it), nothing answers: ETIMEDOUT, not a hang."""
    tb.up("stopped", "psk", 4)
    opts = {**tb.a.options, "timeout": "0.7", "probe_timeout": "0.4"}
    os.kill(tb.a.pid, signal.SIGSTOP)
    try:
        be = get_backend("strongswan", opts)  # a fresh Context: nothing cached
        t0 = time.monotonic()
        with pytest.raises(DaemonTimeoutError) as exc:
            be.find_sa(Flow(socket.IPPROTO_TCP, tb.a.v4, 1, tb.b.v4, 2))
        took = time.monotonic() - t0
        assert exc.value.errno == errno.ETIMEDOUT and tb.a.vici_path in str(exc.value)
        assert took < 0.7 + 0.5
        t0 = time.monotonic()
        with pytest.raises(DaemonTimeoutError):
            be.probe()
        assert time.monotonic() - t0 < 0.4 + 0.4
        # default selection: probes in parallel, reports the most specific failure (ETIMEDOUT)
        t0 = time.monotonic()
        with pytest.raises(OSError) as sel:
            get_backend(None, {**opts, "pluto_ctl": "/nonexistent/pluto.ctl"})
        assert sel.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 1.5
    finally:
        os.kill(tb.a.pid, signal.SIGCONT)
        get_plugin_manager().get_plugin("strongswan").forget(opts)
    assert get_backend("strongswan", tb.a.options).probe() is True


def _bring_up_many(tb, name: str, n: int) -> None:
    a, b = tb.a.v4, tb.b.v4
    children = {f"c{i}": ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{BASE_PORT + i}]"]) for i in range(n)}
    tb.load_conn(name, "psk", 4, children=children)
    tb.initiate(name, "c0")
    ctl = tb.a.ctl
    for i in range(1, n):
        for _ in ctl.initiate({"ike": name, "child": f"c{i}", "timeout": "-1"}):
            pass
    s = ViciSession(tb.a.vici_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = s.list_sas(ike=name, child=f"c{n - 1}")
        kids = [c for e in got for c in e[name].get("child-sas", {}).values() if c.get("state") == b"INSTALLED"]
        if kids:
            break
        time.sleep(0.2)
    s.close()


def test_one_ike_sa_over_charons_message_limit_from_a_fresh_index(tb):
    name = "many"
    _bring_up_many(tb, name, MANY)
    # charon itself cannot list this IKE_SA in one message any more
    assert not [e for e in ViciSession(tb.a.vici_path).list_sas() if name in e]
    opts = {**tb.a.options, "timeout": "10"}
    plugin = get_plugin_manager().get_plugin("strongswan")
    try:
        be = get_backend("strongswan", opts)
        for i in (0, MANY // 2, MANY - 1):
            flow = Flow(socket.IPPROTO_TCP, tb.a.v4, 40000 + i, tb.b.v4, BASE_PORT + i)
            t0 = time.monotonic()
            found = be.find_sa(flow)
            took = time.monotonic() - t0
            assert found is not None, f"child c{i} not found"
            ike, child = found
            assert child.name == f"c{i}" and ike.name == name and child.installed
            print(f"c{i}: answered in {took * 1000:.1f} ms")
        # a port no child covers: negative, and quickly (only candidate configs are listed)
        assert be.find_sa(Flow(socket.IPPROTO_TCP, tb.a.v4, 1, tb.b.v4, BASE_PORT + MANY + 5)) is None
        index = plugin.context(opts).index
        assert index.lazy_listings <= 8
        # losing one child: only that child changes, the others stay
        cid = child.uniqueid
        for _ in tb.a.ctl.terminate({"ike": name, "child-id": cid, "timeout": "5000"}):
            pass
        assert be.find_sa(flow) is None
        assert be.find_sa(Flow(socket.IPPROTO_TCP, tb.a.v4, 40000, tb.b.v4, BASE_PORT)) is not None
    finally:
        plugin.forget(opts)
        tb.unload_conn(name)
