"""The testbed itself: prerequisites present (CI must fail, not skip, without them) and clean teardown."""

from __future__ import annotations

import os
import subprocess

import pytest

from btns_lab.testbed import Testbed, check_prerequisites

pytestmark = pytest.mark.testbed


def test_prerequisites_are_installed():
    check_prerequisites()  # raises TestbedError naming what is missing


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_teardown_removes_everything_it_created():
    with Testbed() as tb:
        names = [p.netns for p in tb.peers]
        pids = [p.pid for p in tb.peers]
        workdir = tb.workdir
        assert all(n.startswith("btns-tb-") for n in names)
        assert all(p.link.startswith("btns-") and len(p.link) <= 15 for p in tb.peers)
        assert all(n in _netns() for n in names)
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
        tb.up("hygiene", "psk", 4)
        assert b"ipsec0" in tb.a.exec("ip", "route", "show", "table", "220")
        # charon's own packets (fwmark 0x42) bypass table 220, everything else goes through it
        assert "not from all fwmark 0x42 lookup 220" in tb.a.exec("ip", "rule").decode()
        assert tb.a.exec("sysctl", "-n", "net.ipv4.ip_forward") == tb.b.exec("sysctl", "-n", "net.ipv4.ip_forward")
    listing = _netns()
    assert not any(n in listing for n in names)
    for pid in pids:  # our charons are gone (and were ours: reaped by Popen.wait)
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/comm").read().strip() != "charon"
    assert not workdir.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"btns-{tb.tag}" not in links
