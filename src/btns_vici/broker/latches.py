"""btnsd's side of connection latching: pushed latch-broken notifications, no polling.

A client latches a socket (op ``latch``, the socket as SCM_RIGHTS): btnsd records the
socket's view (as it read it then) and the protection it verified itself, never a client's
claim. A client's process watches (op ``watch`` on a connection of its own): that connection
then carries NOTIFY frames. On every SA event of a backend (its ``watch`` stream) btnsd
re-verifies that backend's latched views (now, and after 50 and 250 ms: the index may see the
event a moment later) and, for every one whose protection no longer meets what was latched
(the RFC 5660 rules of :func:`btns_vici.core.requirements.unmet`), pushes ``{"event":
"latch-broken", "key": [st_dev, st_ino], "reasons": [...]}`` to the watching connections of
the latching process and forgets the latch. When a backend's event stream ends (charon
restarted) every watcher gets ``{"event": "reset"}`` and re-checks everything itself.

The client's latch then re-checks through btnsd with the socket itself (the socket-exact
answer decides; a notification alone never breaks a latch). Latches are kept per process
(SO_PEERCRED pid), at most :data:`MAX_PER_PROCESS` (the oldest goes first), while the process
has any connection to btnsd (its watching one is never closed for idleness), so an idle latched
connection keeps being watched.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..backend import Backend, SAEvent
from ..core.derive import ptoken_for, unprotected_ptoken
from ..core.records import Protection, SocketView
from ..core.requirements import unmet
from ..core.tokens import PToken

log = logging.getLogger("btnsd")

MAX_PER_PROCESS = 4096
RECHECK_DELAYS = (0.0, 0.05, 0.25)


class Latches:
    """Latched views by client; watchers by process; one event watch per backend."""

    def __init__(
        self,
        push: Callable[[Any, dict[str, Any]], None],
        submit: Callable[..., Any],
        on_break: Callable[[], None] | None = None,
    ) -> None:
        self._push = push  # (watching client, notification) -> sent or the client dropped
        self._submit = submit  # run a function in the pool
        self._on_break = on_break
        self._lock = threading.Lock()
        #: pid -> socket key -> (pid, backend, view, latched pToken)
        self.latched: dict[int, OrderedDict[tuple[int, int], tuple[int, Backend, SocketView, PToken]]] = {}
        #: pid -> client ident -> watching client
        self.watchers: dict[int, dict[int, Any]] = {}
        self._stops: dict[int, Callable[[], None]] = {}  # id(backend) -> stop its watch
        self.breaks = 0

    # -- registration ---------------------------------------------------------------------------
    def latch(self, pid: int, be: Backend, view: SocketView, verdict: Any) -> PToken:
        """Record a protected view; its pToken (EACCES-worthy None when it is not protected)."""
        tok = ptoken_for(verdict) if isinstance(verdict, Protection) else None
        if tok is None:
            raise ValueError("not protected")
        key = view.key
        if key is None:
            raise ValueError("a socket without an identity cannot be latched")
        self.arm(be)
        with self._lock:
            mine = self.latched.setdefault(pid, OrderedDict())
            mine.pop(key, None)
            mine[key] = (pid, be, view, tok)
            while len(mine) > MAX_PER_PROCESS:
                mine.popitem(last=False)
        return tok

    def unlatch(self, pid: int, key: tuple[int, int]) -> None:
        with self._lock:
            mine = self.latched.get(pid)
            if mine is not None:
                mine.pop(key, None)

    def watch(self, client: Any) -> Callable[[], None]:
        """``client``'s connection carries notifications from now on; the function undoes it."""
        with self._lock:
            self.watchers.setdefault(client.pid, {})[client.ident] = client

        def stop() -> None:
            with self._lock:
                peers = self.watchers.get(client.pid)
                if peers is not None:
                    peers.pop(client.ident, None)
                    if not peers:
                        del self.watchers[client.pid]

        return stop

    def drop(self, pid: int) -> None:
        """The process has no connection to btnsd left: forget its latches."""
        with self._lock:
            self.latched.pop(pid, None)

    def arm(self, be: Backend) -> None:
        """Watch ``be``'s SA events (once; again after its stream ended). Connecting to the daemon
        happens in the pool, never in btnsd's loop (a stopped charon would stall it)."""
        with self._lock:
            if id(be) in self._stops:
                return
            self._stops[id(be)] = lambda: None  # claimed: a concurrent arm does not watch twice
        self._submit(self._arm_now, be)

    def _arm_now(self, be: Backend) -> None:
        try:
            stop = be.watch(functools.partial(self._event, be))
        except OSError as exc:
            with self._lock:
                self._stops.pop(id(be), None)
            log.info("cannot watch %s for latches (retried every second): %s", be.name, exc)
            return
        with self._lock:
            self._stops[id(be)] = stop
        # Whatever changed before the watch stood (a latch made meanwhile, events missed while
        # the stream was down) is caught by one re-check now.
        self._recheck_logged(be)

    def close(self) -> None:
        with self._lock:
            stops = list(self._stops.values())
            self._stops.clear()
        for stop in stops:
            stop()

    def count(self) -> int:
        with self._lock:
            return sum(len(m) for m in self.latched.values())

    # -- events ---------------------------------------------------------------------------------
    def _event(self, be: Backend, ev: SAEvent) -> None:
        if ev.kind == "reset":  # the stream ended: watchers re-check themselves; re-armed on demand
            with self._lock:
                self._stops.pop(id(be), None)
                everyone = [c for peers in self.watchers.values() for c in peers.values()]
            for c in everyone:
                self._push(c, {"event": "reset"})
            return
        self._submit(self._recheck_logged, be)

    def _recheck_logged(self, be: Backend) -> None:
        try:
            self._recheck(be)
        except Exception:  # a pool future would swallow it: say it
            log.exception("latch re-check failed")

    def _recheck(self, be: Backend) -> None:
        for delay in RECHECK_DELAYS:
            if delay:
                time.sleep(delay)
            with self._lock:
                mine = [(k, e) for latches in self.latched.values() for k, e in latches.items() if e[1] is be]
            for key, (pid, _be, view, latched) in mine:
                try:
                    verdict = be.protect(view)
                except OSError as exc:
                    current = unprotected_ptoken(view.flow, f"the IKE daemon cannot be asked: {exc.strerror}")
                else:
                    current = (
                        ptoken_for(verdict)
                        if isinstance(verdict, Protection)
                        else unprotected_ptoken(view.flow, verdict.reason)
                    )
                reasons = unmet(latched, current, policy=False)
                if not reasons:
                    continue
                with self._lock:
                    latches = self.latched.get(pid)
                    if latches is None or latches.get(key) is None or latches[key][3] is not latched:
                        continue  # unlatched or re-latched meanwhile
                    del latches[key]
                    self.breaks += 1
                    peers = list(self.watchers.get(pid, {}).values())
                log.info("latch broken for %s (pid %d): %s", view.flow, pid, "; ".join(reasons))
                if self._on_break is not None:
                    self._on_break()
                note = {"event": "latch-broken", "key": list(key), "reasons": list(reasons)}
                for c in peers:
                    self._push(c, note)
