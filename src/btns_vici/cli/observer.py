"""Latching seen from outside: every protected connection of a namespace, latched as it appears.

``btns watch`` cannot hold other processes' latches (:mod:`btns_vici.latch` lives in the
application), so it applies the same rule to every connected socket it sees: the first
verified pToken of a connection is latched; when a later one no longer meets it
(:func:`btns_vici.core.requirements.unmet`: weaker, other peer, or gone) the latch breaks, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backend import Backend
from ..core.requirements import unmet
from ..core.selectors import Flow
from ..core.tokens import PToken
from .describe import entry_view, verify_view
from .sockdiag import list_sockets

Key = tuple[int, Flow]  # (socket inode, flow): a flow may be reused by a later socket


@dataclass(frozen=True)
class LatchEvent:
    kind: str  # "latched" | "latch-broken"
    flow: Flow
    inode: int
    policy: str  # the SA ("conn/child") latched
    peer_id: str  # audit string of the latched peer iToken
    reasons: tuple[str, ...] = ()


class SocketLatches:
    """The latches of one namespace's connections; :meth:`scan` reports what changed."""

    def __init__(self, backend: Backend, netns_name: str | None) -> None:
        self.backend = backend
        self.netns = netns_name
        self.latched: dict[Key, PToken] = {}
        self.broken: set[Key] = set()

    def _current(self) -> dict[Key, PToken]:
        out = {}
        for entry in list_sockets(self.netns):
            view = entry_view(entry, self.backend.netns_id)
            if view is not None and entry.inode:  # TIME-WAIT sockets have no inode: nothing to latch
                out[(entry.inode, view.flow)] = verify_view(view, self.backend)[1]
        return out

    def scan(self) -> list[LatchEvent]:
        """Latch new protected connections, break latches whose protection no longer meets them."""
        current = self._current()
        events = []
        for key in [k for k in self.latched if k not in current]:  # socket closed: forget quietly
            del self.latched[key]
        self.broken &= set(current)
        for key, now in current.items():
            held = self.latched.get(key)
            if held is None:
                if now.protected and key not in self.broken:
                    self.latched[key] = now
                    events.append(self._event("latched", key, now))
                continue
            reasons = unmet(held, now)
            if reasons:
                del self.latched[key]
                self.broken.add(key)
                events.append(self._event("latch-broken", key, held, tuple(reasons)))
        return events

    @staticmethod
    def _event(kind: str, key: Key, tok: PToken, reasons: tuple[str, ...] = ()) -> LatchEvent:
        peer = tok.itoken.audit_string if tok.itoken is not None else None
        return LatchEvent(kind, key[1], key[0], tok.policy_name or "", peer or "", reasons)
