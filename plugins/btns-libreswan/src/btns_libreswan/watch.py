"""SA events for libreswan: pluto has no event stream, so ``--showstates`` is polled.

Each poll (~2 ms of whack) is diffed against the last: a state becoming established
is an ``ike-up``/``child-up`` event, one leaving that state or vanishing a ``-down``;
a poll that fails is a ``reset`` (the caller re-reads everything).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from btns_vici.backend import SAEvent
from btns_vici.backendkit import watch_thread

from . import whack
from .normalize import child_state, ike_state, is_ipsec_state
from .parse import parse_showstates

Snapshot = dict[int, tuple[str, bool, bool]]  # serial -> (conn key, is IPsec SA, established)


def _snapshot(options: Mapping[str, str]) -> Snapshot:
    states = parse_showstates(whack.run(options, "--showstates"))
    out = {}
    for s in states.values():
        child = is_ipsec_state(s)
        up = child_state(s) == "INSTALLED" if child else ike_state(s) == "ESTABLISHED"
        out[s.serial] = (s.conn_key, child, up)
    return out


def diff_events(before: Snapshot, now: Snapshot) -> list[SAEvent]:
    """Up/down events between two snapshots: a state becoming established, or leaving it."""
    events = []
    for serial in sorted(set(before) | set(now)):
        was = before.get(serial, ("", False, False))[2]
        key, child, up = now.get(serial) or before[serial]
        is_up = serial in now and up
        if was == is_up:
            continue
        kind = ("child-" if child else "ike-") + ("up" if is_up else "down")
        if child:
            events.append(SAEvent(kind, child_name=key, child_uniqueid=str(serial)))
        else:
            events.append(SAEvent(kind, ike_name=key, ike_uniqueid=str(serial)))
    return events


def watch(options: Mapping[str, str], callback: Callable[[SAEvent], None]) -> Callable[[], None]:
    """Poll ``--showstates`` (pluto has no event stream) and report up/down events."""
    interval = float(options.get("poll_interval", "0.5"))
    before = _snapshot(options)

    def poll() -> list[SAEvent]:
        nonlocal before
        now = _snapshot(options)
        events = diff_events(before, now)
        before = now
        return events

    return watch_thread("btns-libreswan-watch", poll, callback, interval=interval, resume=True, join_timeout=5)
