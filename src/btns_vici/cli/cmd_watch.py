"""``btns watch``: SA events and latching events, one line each, as they happen."""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from ..backend import SAEvent
from . import exits
from .context import open_backend, options_text
from .describe import flow_dict
from .observer import LatchEvent, SocketLatches
from .output import emit_json

#: Re-scan the sockets this long after an SA event (the index may see it a moment later), as latch.py does.
RESCAN_DELAYS = (0.0, 0.05, 0.25)
#: And this often when nothing happens, to latch new connections.
RESCAN_INTERVAL = 1.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sa_record(ev: SAEvent) -> dict[str, Any]:
    return {
        "time": _now(),
        "event": "sa",
        "kind": ev.kind,
        "ike_sa": ev.ike_name,
        "child_sa": ev.child_name,
        "ike_uniqueid": ev.ike_uniqueid,
        "child_uniqueid": ev.child_uniqueid,
    }


def latch_record(ev: LatchEvent) -> dict[str, Any]:
    return {
        "time": _now(),
        "event": "latch",
        "kind": ev.kind,
        "flow": flow_dict(ev.flow),
        "inode": ev.inode,
        "sa": ev.policy,
        "peer": ev.peer_id,
        "reasons": list(ev.reasons),
    }


def text_line(rec: dict[str, Any]) -> str:
    t = rec["time"][11:23]
    if rec["event"] == "sa":
        ike = f"{rec['ike_sa']}#{rec['ike_uniqueid']}" if rec["ike_sa"] else "-"
        child = f" {rec['child_sa']}#{rec['child_uniqueid']}" if rec["child_sa"] else ""
        return f"{t}  {rec['kind']:<12}  {ike}{child}"
    f = rec["flow"]
    flow = f"{f['proto']} {f['local_addr']}:{f['local_port']} -> {f['remote_addr']}:{f['remote_port']}"
    why = f": {'; '.join(rec['reasons'])}" if rec["reasons"] else ""
    return f"{t}  {rec['kind']:<12}  {flow} (inode {rec['inode']}) sa {rec['sa'] or '-'}{why}"


def run(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    events: queue.Queue[SAEvent] = queue.Queue()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    latches = None if args.sa_only else SocketLatches(backend, args.netns)
    if latches is not None:
        latches.scan()  # connections protected before we started are latched silently
    stop_watch = backend.watch(events.put)
    print(f"btns watch: watching backend {backend.name} ({options_text(backend.options)})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    next_scan = time.monotonic() + RESCAN_INTERVAL
    after_event: list[float] = []  # re-scans scheduled by SA events
    printed = 0

    def emit(rec: dict[str, Any]) -> bool:
        """Print one event; True once --count events are out."""
        nonlocal printed
        if args.json:
            emit_json(rec, line=True)
        else:
            print(text_line(rec), flush=True)
        printed += 1
        return args.count is not None and printed >= args.count

    try:
        while not stopping.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return exits.NEGATIVE if args.count is not None else exits.OK
            due = [deadline] if deadline is not None else []
            if latches is not None:
                due += [next_scan, *after_event]
            wait = min([0.2, *(t - now for t in due)])  # short waits: a signal is noticed soon
            try:
                ev = events.get(timeout=max(0.0, wait))
            except queue.Empty:
                ev = None
            if ev is not None:
                if emit(sa_record(ev)):
                    return exits.OK
                if ev.kind == "reset":
                    raise exits.CliError(exits.BACKEND, f"the IKE daemon of backend {backend.name} went away")
                after_event += [time.monotonic() + d for d in RESCAN_DELAYS]
            now = time.monotonic()
            if latches is not None and (now >= next_scan or any(t <= now for t in after_event)):
                after_event = [t for t in after_event if t > now]
                next_scan = now + RESCAN_INTERVAL
                for lev in latches.scan():
                    if emit(latch_record(lev)):
                        return exits.OK
        return exits.OK
    finally:
        stop_watch()
