"""`btns watch`: SA and latching events while a connection comes up and is terminated."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest

from .conftest import BTNS, btns, peer_args

pytestmark = pytest.mark.testbed


class Watcher:
    """`btns --json watch` in the background, its lines collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*BTNS, "--json", "watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self.proc.stderr.readline()  # the registration line
        assert ready.startswith("btns watch: watching backend strongswan"), ready + self.proc.stderr.read()
        self.events: list[dict] = []

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def until(self, pred, timeout: float = 20.0) -> dict:
        """The first (new) event matching ``pred``."""
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if pred(ev):
                return ev
        while time.monotonic() < deadline:
            try:
                ev = json.loads(self.lines.get(timeout=0.2))
            except queue.Empty:
                continue
            self.events.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"no such event within {timeout}s; got {self.events}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.proc.wait(10)


def _is(kind: str, **fields: str):
    return lambda ev: ev["kind"] == kind and all(ev.get(k) == v for k, v in fields.items())


def test_watch_reports_sa_and_latch_events(tb, pair_factory):
    w = Watcher(*peer_args(tb.a), "--timeout", "60")
    try:
        name = "cli-watch"
        tb.up(name, "rawkey")
        up = w.until(_is("ike-up", ike_sa=name))
        child_up = w.until(_is("child-up", ike_sa=name, child_sa="host"))
        assert up["event"] == child_up["event"] == "sa" and up["ike_uniqueid"]
        cli, _ = pair_factory(socket.IPPROTO_TCP, 4)
        port = cli.getsockname()[1]
        latched = w.until(lambda ev: ev["kind"] == "latched" and ev["flow"]["local_port"] == port)
        assert latched["event"] == "latch" and latched["sa"] == f"{name}/host"
        assert latched["flow"]["remote_addr"] == str(tb.b.v4)
        tb.terminate(name)
        w.until(_is("child-down", ike_sa=name, child_sa="host"))
        w.until(_is("ike-down", ike_sa=name))
        broken = w.until(lambda ev: ev["kind"] == "latch-broken" and ev["flow"]["local_port"] == port)
        assert any("privacyProtected" in r for r in broken["reasons"])
        assert w.stop(signal.SIGINT) == 0  # SIGINT is a clean stop
    finally:
        w.stop(signal.SIGKILL)
        tb.unload_conn("cli-watch")


def test_watch_count_and_sigterm(tb):
    w = Watcher(*peer_args(tb.a), "--sa-only", "--count", "2", "--timeout", "30")
    try:
        tb.up("cli-count", "rawkey")
        assert w.proc.wait(20) == 0  # ike-up and child-up, then exit on its own
        kinds = [json.loads(w.lines.get(timeout=5))["kind"] for _ in range(2)]
        assert sorted(kinds) == ["child-up", "ike-up"]
    finally:
        w.stop(signal.SIGKILL)
    w = Watcher(*peer_args(tb.a))
    time.sleep(0.3)
    assert w.stop(signal.SIGTERM) == 0


def test_watch_timeout_before_count_is_exit_1(tb):
    t0 = time.monotonic()
    res = btns("watch", *peer_args(tb.a), "--count", "1", "--timeout", "1")
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and time.monotonic() - t0 >= 1
    res = btns("watch", *peer_args(tb.a), "--timeout", "0.5")
    assert res.returncode == 0, res.stderr


def test_watch_exits_3_when_the_daemon_goes_away(tb):
    w = Watcher(*peer_args(tb.b), "--timeout", "30")
    try:
        tb.b.stop_charon()  # the session testbed's charon B, restarted below
        reset = w.until(_is("reset"))
        assert reset["event"] == "sa"
        assert w.proc.wait(10) == 3
        assert "went away" in w.proc.stderr.read()
    finally:
        w.stop(signal.SIGKILL)
        tb.restart_charon(tb.b)
