"""An SA index fed by charon's VICI events: answers "which CHILD_SA covers this flow" in microseconds.

Correctness rules (hookspecs ``btns_find_sa``: never answer from state older than
the last event processed):

* before every answer the event connection is drained without blocking, so any
  ike-updown / child-updown / ike-rekey / child-rekey charon has already sent is applied;
* the snapshot is taken *after* registering for events, and every event is applied
  idempotently ("this SA is now up/down/replaced"), so nothing between the two is lost;
* when the event connection drops (charon stopped or restarted) everything is thrown
  away; the next query reconnects and re-lists, or raises BackendError while charon is down.

Identities (auth method, peer key, certificate) come from list-conns and list-certs,
cached per connection and refreshed whenever an IKE_SA of that connection comes up.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, ProtocolError
from ..records import ChildSA, Identity, IkeSA
from ..selectors import PROTO_ANY, Flow, TrafficSelector, normalize_address
from . import parse
from .events import EventStream
from .session import ViciSession

Key = tuple[Any, int, int]
Tables = tuple[dict[Key, list], dict[Key, list], dict[Any, list], list]


@dataclass
class _Ike:
    name: str
    section: dict[str, Any]
    children: dict[str, ChildSA] = field(default_factory=dict)
    record: IkeSA | None = None


def _exact(ts: tuple[TrafficSelector, ...]) -> list[Key]:
    """Lookup keys of selectors naming one address, one protocol and one port; [] if any is wider."""
    keys = []
    for t in ts:
        if t.start != t.end or t.proto == PROTO_ANY or t.port_lo != t.port_hi:
            return []
        keys.append((t.start, t.proto, t.port_lo))
    return keys


class SAIndex:
    """The installed CHILD_SAs of one charon, kept current by its events."""

    def __init__(self, path: str, session: ViciSession | None = None, strict: bool = False,
                 timeout: float | None = None) -> None:
        self.path = path
        self.session = session or ViciSession(path)
        self.timeout = self.session.timeout if timeout is None else timeout
        self._lock = threading.RLock()
        self._stream: EventStream | None = None
        self._ikes: dict[str, _Ike] = {}
        self._auth: dict[str, tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]] = {}
        self._certs: parse.CertStore | None = None
        self._tables: Tables | None = None
        self.strict = strict
        self.generation = 0  # bumped on every applied change; callers may cache on it
        self.resyncs = 0

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._reset()
            self.session.close()

    def _reset(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._ikes.clear()
        self._auth.clear()
        self._certs = None
        self._changed()

    def _changed(self) -> None:
        self._tables = None
        self.generation += 1

    def _resync(self) -> None:
        self._reset()
        stream = EventStream(self.path, timeout=self.timeout)  # BackendError when charon is down
        try:
            snapshot = self.session.list_sas()
        except BaseException:
            stream.close()
            raise
        self.resyncs += 1
        for entry in snapshot:
            name, sec = parse.single_section(entry, "list-sas entry")
            ike = self._upsert(name, sec)
            ike.children = parse.children_of(sec)
        self._stream = stream

    def sync(self, barrier: bool = False) -> None:
        """Apply every event charon has sent so far; reconnect and re-list after a restart.

        With ``barrier`` also every event charon raised before this call, even if it is
        still in charon's send queue (one VICI round trip, ~80 us).
        """
        with self._lock:
            if self._stream is None:
                self._resync()
                return
            try:
                events = self._stream.barrier() if barrier else self._stream.poll(0.0)
            except (OSError, BackendError):
                self._reset()
                self._resync()
                return
            for name, msg in events:
                self.apply(name, msg)

    # -- events --------------------------------------------------------------------------------
    def _upsert(self, name: str, sec: Mapping[str, Any]) -> _Ike:
        uid = parse.uniqueid(sec)
        plain = {k: v for k, v in sec.items() if k != "child-sas"}
        ike = self._ikes.get(uid)
        if ike is None:
            ike = self._ikes[uid] = _Ike(name, plain)
        else:
            ike.section, ike.name, ike.record = plain, name, None
        self._changed()
        return ike

    def apply(self, event: str, msg: Mapping[str, Any]) -> None:
        """Apply one VICI event to the index (idempotent); a malformed event is ProtocolError."""
        try:
            self._apply(event, msg)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ProtocolError(f"malformed VICI {event} event: {type(exc).__name__}: {exc}") from None

    def _apply(self, event: str, msg: Mapping[str, Any]) -> None:
        with self._lock:
            up = msg.get("up") == b"yes"
            name, sec = parse.single_section(msg, event)
            if event == "ike-updown":
                uid = parse.uniqueid(sec)
                if up:
                    self._upsert(name, sec)
                    self._auth.pop(name, None)  # re-read its identities (conn may have been reloaded)
                    self._certs = None
                elif self._ikes.pop(uid, None) is not None:
                    self._changed()
            elif event == "child-updown":
                kids = parse.children_of(sec)
                if up:
                    ike = self._upsert(name, sec)
                    ike.children.update(kids)
                else:
                    ike = self._ikes.get(parse.uniqueid(sec))
                    if ike is not None:
                        for cid in kids:
                            ike.children.pop(cid, None)
                        ike.record = None
                        self._changed()
            elif event == "child-rekey":
                ike = self._upsert(name, sec)
                pair = sec.get("child-sas", {})
                for entry in pair.values():
                    old, new = entry.get("old"), entry.get("new")
                    if old is not None:
                        ike.children.pop(parse.parse_child(old).uniqueid, None)
                    if new is not None:
                        child = parse.parse_child(new)
                        ike.children[child.uniqueid] = child
            elif event == "ike-rekey":
                old_sec, new_sec = sec.get("old"), sec.get("new")
                old = self._ikes.pop(parse.uniqueid(old_sec), None) if old_sec else None
                if new_sec is not None:
                    ike = self._upsert(name, new_sec)
                    if old is not None:
                        ike.children.update(old.children)
                self._changed()

    # -- queries -------------------------------------------------------------------------------
    def _identities(self, ike: _Ike) -> tuple[Identity, Identity]:
        auth = self._auth.get(ike.name)
        if auth is None:
            conns = self.session.list_conns(ike.name)
            conn = next((c[ike.name] for c in conns if ike.name in c), None)
            auth = (None, None) if conn is None else (parse.conn_auth(conn, "local"), parse.conn_auth(conn, "remote"))
            self._auth[ike.name] = auth
        if self._certs is None:
            self._certs = parse.CertStore.from_vici(self.session.list_certs())
        sec = ike.section
        local = parse.identity(parse.text(sec.get("local-id", b""), "local-id"), auth[0], self._certs)
        remote = parse.identity(parse.text(sec.get("remote-id", b""), "remote-id"), auth[1], self._certs)
        return local, remote

    def _record(self, uid: str) -> IkeSA:
        ike = self._ikes[uid]
        if ike.record is None:
            local, remote = self._identities(ike)
            kids = tuple(sorted(ike.children.values(), key=lambda c: int(c.uniqueid)))
            ike.record = parse.parse_ike(ike.name, ike.section, local, remote, kids)
        return ike.record

    def _lookup_tables(self) -> Tables:
        """Installed CHILD_SAs by exact remote (addr, proto, port), exact local one, remote address, rest."""
        if self._tables is None:
            by_remote: dict[Key, list] = {}
            by_local: dict[Key, list] = {}
            by_raddr: dict[Any, list] = {}
            wide: list = []
            for uid, ike in self._ikes.items():
                for child in ike.children.values():
                    if not child.installed:
                        continue
                    item = (uid, child, _compiled(child.local_ts), _compiled(child.remote_ts))
                    rkeys, lkeys = _exact(child.remote_ts), _exact(child.local_ts)
                    if rkeys:
                        for k in rkeys:
                            by_remote.setdefault(k, []).append(item)
                    elif lkeys:
                        for k in lkeys:
                            by_local.setdefault(k, []).append(item)
                    elif child.remote_ts and all(t.start == t.end for t in child.remote_ts):
                        for t in child.remote_ts:  # host-to-host SAs: one peer address each
                            by_raddr.setdefault(t.start, []).append(item)
                    else:
                        wide.append(item)
            for bucket in by_raddr.values():
                bucket.sort(key=lambda it: _breadth(it[1]))
            wide.sort(key=lambda it: _breadth(it[1]))
            self._tables = (by_remote, by_local, by_raddr, wide)
        return self._tables

    def find(self, flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        """The established IKE_SA and installed CHILD_SA covering ``flow`` (most specific first).

        Events already received are applied first (a non-blocking read). A negative answer,
        or any answer when ``strict``, is confirmed after a barrier: charon sends an
        SA's child-updown(up) event after answering the initiate that created it, so a
        socket connected right after ``initiate`` returned would otherwise look unprotected.
        (Down events precede the reply to ``terminate``, and a deleted SA's routes are gone
        from the data plane, which the data-plane proof checks independently.)
        """
        with self._lock:
            self.sync()
            found = None if self.strict else self._find(flow)
            if found is None:
                self.sync(barrier=True)
                found = self._find(flow)
            if found is None and self._refresh_pending():
                found = self._find(flow)
            return found

    def _refresh_pending(self) -> bool:
        """Re-list the IKE_SAs whose last event showed IKE tasks in flight.

        charon may answer ``initiate`` (or ``rekey``) before it raises the matching
        child-updown/child-rekey event; the tasks it was running then are in the event's
        ``tasks-active``. Re-listing such an IKE_SA (``list-sas ike-id``) replaces its
        state with charon's current one, which has no tasks left once they completed.
        """
        pending = [uid for uid, ike in self._ikes.items() if ike.section.get("tasks-active")]
        for uid in pending:
            listed = self.session.list_sas(int(uid))
            if not listed:
                self._ikes.pop(uid, None)
                self._changed()
                continue
            for entry in listed:
                name, sec = parse.single_section(entry, "list-sas entry")
                ike = self._upsert(name, sec)
                ike.children = parse.children_of(sec)
        return bool(pending)

    def _find(self, flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        by_remote, by_local, by_raddr, wide = self._lookup_tables()
        ra, la = normalize_address(flow.remote_addr), normalize_address(flow.local_addr)
        proto, lport, rport = flow.proto, flow.local_port, flow.remote_port
        lkey, rkey = (la.version, int(la)), (ra.version, int(ra))
        for bucket in (
            by_remote.get((ra, proto, rport), ()),
            by_local.get((la, proto, lport), ()),
            by_raddr.get(ra, ()),
            wide,
        ):
            for uid, child, lsel, rsel in bucket:
                if _match(lsel, lkey, proto, lport) and _match(rsel, rkey, proto, rport):
                    ike = self._record(uid)
                    if ike.is_established:
                        return ike, child
        return None

    def child_ids(self) -> dict[str, set[str]]:
        """{IKE_SA uniqueid: CHILD_SA uniqueids} as the index holds them now (no sync)."""
        with self._lock:
            return {uid: set(ike.children) for uid, ike in self._ikes.items()}

    def snapshot(self) -> list[IkeSA]:
        """Every IKE_SA the index holds, as records."""
        with self._lock:
            self.sync()
            return [self._record(uid) for uid in list(self._ikes)]


Compiled = tuple[tuple[int, int, int, int, int, int], ...]


def _compiled(ts: tuple[TrafficSelector, ...]) -> Compiled:
    """Selectors as (version, first, last, proto, port_lo, port_hi) integers for :func:`_match`."""
    return tuple((t.version, int(t.start), int(t.end), t.proto, t.port_lo, t.port_hi) for t in ts)


def _match(sel: Compiled, addr: tuple[int, int], proto: int, port: int) -> bool:
    """TrafficSelector.covers over compiled selectors (same semantics, no objects on the hot path)."""
    version, value = addr
    for v, first, last, p, lo, hi in sel:
        if v == version and first <= value <= last and (p == PROTO_ANY or (p == proto and lo <= port <= hi)):
            return True
    return False


def _breadth(child: ChildSA) -> int:
    """How much a CHILD_SA's selectors cover: narrower ones match first, like an SPD."""
    total = 0
    for t in child.local_ts + child.remote_ts:
        total += (int(t.end) - int(t.start) + 1) * (t.port_hi - t.port_lo + 1) * (256 if t.proto == 0 else 1)
    return total
