"""An SA index fed by charon's VICI events: answers "which CHILD_SA covers this flow" in microseconds.

Correctness rules (hookspecs ``btns_find_sa``: never answer from state older than
the last event processed):

* before every answer the event connection is drained without blocking, so any
  ike-updown / child-updown / ike-rekey / child-rekey charon has already sent is applied;
* the snapshot is taken *after* registering for events, and every event is applied
  idempotently ("this SA is now up/down/replaced"), so nothing between the two is lost;
* when the event connection drops (charon stopped or restarted) everything is thrown
  away; the next query reconnects and re-lists, or raises BackendError while charon is down.

Scale (charon drops any VICI message over 512 KiB, so one IKE_SA with more than about
1,950 CHILD_SAs never appears in an unfiltered list-sas):

* the snapshot is one list-sas filtered to a child name no configuration has
  (``{"child": NO_CHILD}``): every IKE_SA without its CHILD_SAs, a few hundred bytes each.
  Every IKE_SA starts *partial*: its CHILD_SAs are listed lazily, per flow, by CHILD_SA
  config name (``{"ike-id": N, "child": NAME}``) for the child configs of its connection
  whose configured selectors could cover the flow (negotiated selectors are always within
  the configured ones; ``dynamic`` counts as any address). The library's own connections
  (``btns-init-``/``btns-resp-``, :func:`.enforce.conn_config`) have one child named like the
  connection between the IKE_SA's two hosts: they need no configuration at all. Other
  connections' configurations come from ``list-conns`` of that one connection (charon
  spends ~0.1 ms per child config building it: the limit of a fresh answer), fetched
  in the background for every connection with an IKE_SA (:meth:`SAIndex.warm`, starting
  :data:`WARM_DELAY` after the first answer), on demand
  when a flow needs one first. So a fresh answer needs the skeleton and the candidates'
  configurations, never the whole index;
* an event about one CHILD_SA changes that CHILD_SA only (the lookup tables are maintained
  incrementally); a negative answer for an IKE_SA with tasks in flight re-lists only the
  child configs that could cover the flow, never the whole IKE_SA.

Identities (auth method, peer key, certificate) come from list-conns and list-certs,
cached per connection and refreshed whenever an IKE_SA of that connection comes up.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..core.errors import BackendError, ProtocolError
from ..core.records import ChildSA, Identity, IkeSA
from ..core.selectors import PROTO_ANY, Flow, IPAddress, TrafficSelector, normalize_address
from . import coverage, parse
from .compiled import Compiled
from .compiled import compiled as _compiled
from .compiled import config_selectors as _cfg_compiled
from .coverage import LIBRARY_CONN
from .coverage import match as _match
from .events import EventStream
from .session import ViciSession

log = logging.getLogger(__name__)
T = TypeVar("T")

Key = tuple[Any, int, int]
#: A CHILD_SA name no configuration has: list-sas filtered by it lists every IKE_SA with no CHILD_SAs.
NO_CHILD = "#btns-vici:no-child#"
#: Connections with more child configs than this are listed lazily, per flow (their IKE_SAs may exceed
#: 512 KiB, and listing a few candidates answers a fresh query faster than listing them whole).
BIG_CONN = 64
#: Flows whose candidate child configs were already listed (cleared on any new IKE_SA or config).
MAX_CHECKED = 1 << 16
#: Reads of one CHILD_SA's selectors that may disagree before the answer is EPROTO (see SAIndex._confirm).
CONFIRM_TRIES = 3
#: CHILD_SAs whose selectors stay confirmed (cleared when full: they are then confirmed again).
MAX_CONFIRMED = 1 << 16
#: Seconds after the first answer before the background warming starts: a short-lived process
#: (one CLI command) exits first and never makes charon build configurations it will not use.
WARM_DELAY = 1.0


@dataclass
class _Ike:
    name: str
    section: dict[str, Any]
    children: dict[str, ChildSA] = field(default_factory=dict)
    record: IkeSA | None = None
    complete: bool = True  # every CHILD_SA was listed (else: listed lazily per child config)
    fetched: set[str] = field(default_factory=set)  # child config names listed while partial


Item = tuple[str, ChildSA, "Compiled", "Compiled", int]


def _exact(ts: tuple[TrafficSelector, ...]) -> list[Key]:
    """Lookup keys of selectors naming one address, one protocol and one port; [] if any is wider."""
    keys = []
    for t in ts:
        if t.start != t.end or t.proto == PROTO_ANY or t.port_lo != t.port_hi:
            return []
        keys.append((t.start, t.proto, t.port_lo))
    return keys


def _by_breadth(item: Item) -> int:
    return item[4]


class _Tables:
    """Installed CHILD_SAs by exact remote (addr, proto, port), exact local one, remote address, rest.

    Maintained incrementally: adding or removing one CHILD_SA touches its own buckets only.
    """

    def __init__(self) -> None:
        self.by_remote: dict[Key, list[Item]] = {}
        self.by_local: dict[Key, list[Item]] = {}
        self.by_raddr: dict[Any, list[Item]] = {}
        self.wide: list[Item] = []
        self.placed: dict[tuple[str, str], tuple[Item, list[list[Item]]]] = {}

    def add(self, uid: str, child: ChildSA) -> None:
        self.remove(uid, child.uniqueid)
        if not child.installed:
            return
        item: Item = (uid, child, _compiled(child.local_ts), _compiled(child.remote_ts), _breadth(child))
        slots: list[list[Item]] = []
        rkeys, lkeys = _exact(child.remote_ts), _exact(child.local_ts)
        if rkeys:
            for k in rkeys:
                bucket = self.by_remote.setdefault(k, [])
                bucket.append(item)
                slots.append(bucket)
        elif lkeys:
            for k in lkeys:
                bucket = self.by_local.setdefault(k, [])
                bucket.append(item)
                slots.append(bucket)
        elif child.remote_ts and all(t.start == t.end for t in child.remote_ts):
            for t in child.remote_ts:  # host-to-host SAs: one peer address each
                bucket = self.by_raddr.setdefault(t.start, [])
                bisect.insort(bucket, item, key=_by_breadth)
                slots.append(bucket)
        else:
            bisect.insort(self.wide, item, key=_by_breadth)
            slots.append(self.wide)
        self.placed[(uid, child.uniqueid)] = (item, slots)

    def remove(self, uid: str, cid: str) -> None:
        entry = self.placed.pop((uid, cid), None)
        if entry is None:
            return
        item, slots = entry
        for bucket in slots:
            for i, it in enumerate(bucket):
                if it is item:
                    del bucket[i]
                    break


class SAIndex:
    """The installed CHILD_SAs of one charon, kept current by its events."""

    def __init__(
        self,
        path: str,
        session: ViciSession | None = None,
        strict: bool = False,
        timeout: float | None = None,
        background: bool = False,
        shared_cache: bool = True,
    ) -> None:
        self.path = path
        self.session = session or ViciSession(path)
        self.timeout = self.session.timeout if timeout is None else timeout
        self._lock = threading.RLock()
        self._stream: EventStream | None = None
        self._ikes: dict[str, _Ike] = {}
        self._conns: dict[str, Mapping[str, Any] | None] = {}
        self._cfg_sel: dict[str, dict[str, tuple[Compiled, Compiled]]] = {}
        self._certs: parse.CertStore | None = None
        self._tables = _Tables()
        self._checked: set[tuple[int, IPAddress, int, IPAddress, int]] = set()
        self.strict = strict
        self.generation = 0  # bumped on every applied change; callers may cache on it
        self.resyncs = 0
        self.lazy_listings = 0  # list-sas by child config (partial IKE_SAs, tasks in flight)
        self.confirm_listings = 0  # second reads of selectors (_confirm, _confirm_config)
        self.background = background
        self._conn_epoch = 0  # bumped whenever a cached configuration is forgotten
        self._warmer: threading.Thread | None = None
        self._warm_due = False
        # the coverage cache shared between processes (:mod:`.coverage`): hints only
        self.shared_cache = shared_cache
        self._coverage: coverage.Coverage | None = None
        self._coverage_read = False
        self._cov_flow: tuple[Flow, dict[str, set[str]]] | None = None
        self._cov_used = False
        #: (newest IKE_SA uniqueid, those not established) known when a config was fetched (coverage.known_ikes)
        self._conn_max_ike: dict[str, tuple[int, frozenset[int]]] = {}
        self._cache_dirty = False
        self.cache_hits = 0  # answers found through the shared coverage cache
        #: (IKE_SA, CHILD_SA uniqueid) -> the ChildSA record whose selectors a second listing confirmed
        self._confirmed: dict[tuple[str, str], ChildSA] = {}
        #: CHILD_SAs (IKE_SA, CHILD_SA uniqueid) and connections whose selectors were read only once
        self._unconfirmed: set[tuple[str, str]] = set()
        self._cfg_unconfirmed: set[str] = set()

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
        self._conns.clear()
        self._cfg_sel.clear()
        self._certs = None
        self._tables = _Tables()
        self._checked.clear()
        self._confirmed.clear()
        self._unconfirmed.clear()
        self._cfg_unconfirmed.clear()
        self._coverage, self._coverage_read, self._cov_flow = None, False, None
        self._conn_max_ike.clear()
        self._changed()

    def _changed(self) -> None:
        self.generation += 1

    def _resync(self) -> None:
        self._reset()
        stream = EventStream(self.path, timeout=self.timeout)  # BackendError when charon is down
        try:
            self._snapshot()
        except BaseException:
            stream.close()
            self._reset()
            raise
        self.resyncs += 1
        self._stream = stream
        self._warm_due = self.background  # after the next answer: never competing with it in charon

    def _snapshot(self) -> None:
        """Every IKE_SA without its CHILD_SAs (one small message each); CHILD_SAs come per flow."""

        def skeleton(entry: dict[str, Any]) -> None:
            name, sec = parse.single_section(entry, "list-sas entry")
            ike = self._upsert(name, sec)
            kids = parse.children_of(sec)
            if kids:  # a charon without child filters listed everything after all
                self._set_children(ike, kids)
            else:
                ike.complete = False

        self.session.stream("list-sas", "list-sa", {"child": NO_CHILD}, skeleton)

    # -- background warming (configurations, small IKE_SAs) ------------------------------------
    def _start_warmer(self) -> None:
        if self._warmer is not None and self._warmer.is_alive():
            return

        def later() -> None:
            time.sleep(WARM_DELAY)
            self.warm()

        self._warmer = threading.Thread(target=later, name="btns-index-warm", daemon=True)
        self._warmer.start()

    def warmed(self, timeout: float) -> bool:
        """Wait until the background warming started after the first answer has finished (True),
        or ``timeout`` seconds (False). For benchmarks and tests of a warm index."""
        end = time.monotonic() + timeout
        while self._warm_due and time.monotonic() < end:
            time.sleep(0.01)
        warmer = self._warmer
        if warmer is not None:
            warmer.join(max(0.0, end - time.monotonic()))
            return not warmer.is_alive()
        return not self._warm_due

    def warm(self, session: ViciSession | None = None) -> int:
        """Fetch, outside the index lock, the configuration of every connection with an IKE_SA
        (a later flow then needs no list-conns), and list the IKE_SAs of small connections
        whole; the number of configurations fetched. Results are applied only when nothing
        changed meanwhile (no configuration forgotten, no event applied to that IKE_SA)."""
        own = session is None
        bg = session or ViciSession(self.path, self.session.timeout, self.session.list_timeout)
        fetched = 0
        try:
            with self._lock:
                names = sorted({ike.name for ike in self._ikes.values() if not ike.complete} - set(self._conns))
            for name in names:
                if LIBRARY_CONN.fullmatch(name):
                    continue
                with self._lock:
                    epoch = self._conn_epoch
                conn = _fetch_conn(bg, name)
                with self._lock:
                    if epoch == self._conn_epoch and name not in self._conns:
                        self._conns[name] = conn
                        if conn is not None:
                            self._cfg_unconfirmed.add(name)  # one read: confirmed below or when needed
                        self._conn_max_ike[name] = self._max_ike()
                        fetched += 1
            self._confirm_configs_in(bg)
            with self._lock:
                small = [
                    uid
                    for uid, ike in self._ikes.items()
                    if not ike.complete and (c := self._conns.get(ike.name)) is not None and _child_count(c) <= BIG_CONN
                ]
            for uid in small:
                with self._lock:
                    gen = self.generation
                entries = bg.list_sas(ike_id=uid)
                with self._lock:
                    ike = self._ikes.get(uid)
                    if gen != self.generation or ike is None or ike.complete or not entries:
                        continue  # something changed meanwhile: the per-flow path stays exact
                    got, sec = parse.single_section(entries[0], "list-sas entry")
                    if parse.uniqueid(sec) != uid:
                        continue
                    ike = self._upsert(got, sec)
                    self._set_children(ike, parse.children_of(sec))
                    ike.complete = True
        except (OSError, BackendError) as exc:
            log.info("background warming of the SA index stopped: %s", exc)
        finally:
            if own:
                bg.close()
        if fetched:
            with self._lock:
                self._cache_dirty = True
            self.save_coverage()
        return fetched

    def _confirm_configs_in(self, bg: ViciSession) -> None:
        """The warmer's second read of every configuration read once (see :meth:`_confirm_config`),
        off the answer path: a later negative answer then re-reads nothing. A read that differs is
        left to the answer path (which reads until two agree)."""
        with self._lock:
            names = sorted(self._cfg_unconfirmed)
        for name in names:
            with self._lock:
                epoch = self._conn_epoch
                held = self._conns.get(name)
            if held is None:
                continue
            try:
                conn = _fetch_conn(bg, name)
            except ProtocolError:
                continue
            if conn is None:
                continue
            try:
                again = _conn_selectors(conn)
            except ProtocolError:
                continue
            with self._lock:
                if epoch != self._conn_epoch or self._conns.get(name) is not held:
                    continue  # forgotten or refetched meanwhile
                try:
                    first = self._child_configs(name)
                except ProtocolError:
                    continue
                if first == again:
                    self._cfg_unconfirmed.discard(name)

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
                try:
                    self.apply(name, msg)
                except parse.GarbledSelectorError as exc:  # charon's formatting race: rebuild from listings
                    log.warning("VICI %s event with a garbled selector (%s): rebuilding the index", name, exc)
                    self._reset()
                    self._resync()
                    return

    # -- state changes -------------------------------------------------------------------------
    def _upsert(self, name: str, sec: Mapping[str, Any]) -> _Ike:
        uid = parse.uniqueid(sec)
        plain = {k: v for k, v in sec.items() if k != "child-sas"}
        ike = self._ikes.get(uid)
        if ike is None:
            ike = self._ikes[uid] = _Ike(name, plain)
            self._checked.clear()
        else:
            ike.section, ike.name, ike.record = plain, name, None
        self._changed()
        return ike

    def _uid_of(self, ike: _Ike) -> str:
        return parse.uniqueid(ike.section)

    def _add_child(self, ike: _Ike, child: ChildSA) -> None:
        ike.children[child.uniqueid] = child
        uid = self._uid_of(ike)
        self._tables.add(uid, child)
        if self._confirmed.get((uid, child.uniqueid)) is not child:
            self._unconfirmed.add((uid, child.uniqueid))
        ike.record = None
        self._changed()

    def _remove_child(self, ike: _Ike, cid: str) -> None:
        if ike.children.pop(cid, None) is not None:
            uid = self._uid_of(ike)
            self._unconfirmed.discard((uid, cid))
            self._confirmed.pop((uid, cid), None)
            self._tables.remove(uid, cid)
            ike.record = None
            self._changed()

    def _set_children(self, ike: _Ike, kids: Mapping[str, ChildSA]) -> None:
        for cid in list(ike.children):
            if cid not in kids:
                self._remove_child(ike, cid)
        for child in kids.values():
            self._add_child(ike, child)

    def _drop_ike(self, uid: str) -> _Ike | None:
        ike = self._ikes.pop(uid, None)
        if ike is not None:
            for cid in ike.children:
                self._tables.remove(uid, cid)
            self._changed()
        return ike

    # -- events --------------------------------------------------------------------------------
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
                    self._forget_conn(name)  # re-read its identities (conn may have been reloaded)
                    self._certs = None
                else:
                    self._drop_ike(uid)
            elif event == "child-updown":
                kids = parse.children_of(sec)
                if up:
                    ike = self._upsert(name, sec)
                    for child in kids.values():
                        self._add_child(ike, child)
                else:
                    known = self._ikes.get(parse.uniqueid(sec))
                    if known is not None:
                        for cid in kids:
                            self._remove_child(known, cid)
            elif event == "child-rekey":
                ike = self._upsert(name, sec)
                pair = sec.get("child-sas", {})
                for entry in pair.values():
                    old, new = entry.get("old"), entry.get("new")
                    if old is not None:
                        self._remove_child(ike, parse.parse_child(old).uniqueid)
                    if new is not None:
                        self._add_child(ike, parse.parse_child(new))
            elif event == "ike-rekey":
                old_sec, new_sec = sec.get("old"), sec.get("new")
                old = self._drop_ike(parse.uniqueid(old_sec)) if old_sec else None
                if new_sec is not None:
                    ike = self._upsert(name, new_sec)
                    if old is not None:
                        ike.complete = ike.complete and old.complete
                        ike.fetched |= old.fetched
                        for child in old.children.values():
                            self._add_child(ike, child)
                self._changed()

    # -- lazy listing by child config ----------------------------------------------------------
    def _forget_conn(self, name: str) -> None:
        self._conn_epoch += 1
        self._conns.pop(name, None)
        self._cfg_sel.pop(name, None)
        self._cfg_unconfirmed.discard(name)
        self._conn_max_ike.pop(name, None)
        self._checked.clear()

    def _conn(self, name: str) -> Mapping[str, Any] | None:
        if name not in self._conns:
            conn = _fetch_conn(self.session, name)
            self._conns[name] = conn
            if conn is not None:
                self._cfg_unconfirmed.add(name)
            self._conn_max_ike[name] = self._max_ike()
            self._cache_dirty = True
        return self._conns[name]

    def _max_ike(self) -> tuple[int, frozenset[int]]:
        return coverage.known_ikes((ike.name, ike.section) for ike in self._ikes.values())

    # -- the coverage cache shared between processes (hints, never answers) --------------------
    def _cached(self, ike: _Ike) -> coverage.ConnEntry | None:
        """The shared cache's entry for ``ike``'s connection when it may be used for this IKE_SA:
        no live configuration fetched, the same charon, and the IKE_SA not newer than the fetch."""
        if not self.shared_cache or ike.name in self._conns:
            return None
        if not self._coverage_read:
            self._coverage_read = True
            self._coverage = coverage.read(self.path)
        if self._coverage is None:
            return None
        entry = self._coverage.conns.get(ike.name)
        if entry is None or not entry.serves(self._uid_of(ike)):
            return None
        return entry

    def _cached_candidates(self, ike: _Ike, flow: Flow) -> set[str] | None:
        if self._cached(ike) is None or self._coverage is None:
            return None
        if self._cov_flow is None or self._cov_flow[0] != flow:
            la, ra = normalize_address(flow.local_addr), normalize_address(flow.remote_addr)
            try:
                found = self._coverage.candidates(
                    la.version, int(la), flow.local_port, int(ra), flow.remote_port, flow.proto
                )
            except coverage.Invalid as exc:
                log.warning("ignoring the coverage cache: %s", exc)
                self._drop_coverage()
                return None
            self._cov_flow = (flow, found)
        self._cov_used = True
        return set(self._cov_flow[1].get(ike.name, ()))

    def _drop_coverage(self) -> None:
        """Stop using the shared cache in this process (it misled once, or is malformed)."""
        self.shared_cache = False
        self._coverage, self._cov_flow = None, None
        self._checked.clear()
        for ike in self._ikes.values():
            ike.record = None  # identities may have come from it

    def save_coverage(self) -> bool:
        """Write the configurations this process fetched live to the shared cache (if any new)."""
        with self._lock:
            if not self._cache_dirty or self._stream is None:
                return False
            self._cache_dirty = False
            conns: dict[str, coverage.ConnConfig] = {}
            for name, conn in self._conns.items():
                if conn is None or LIBRARY_CONN.fullmatch(name):
                    continue
                try:
                    sel = self._child_configs(name)
                except ProtocolError:
                    continue
                if sel is None:
                    continue
                local, remote = parse.conn_auth(conn, "local"), parse.conn_auth(conn, "remote")
                newest, pending = self._conn_max_ike.get(name, (0, frozenset()))
                conns[name] = coverage.ConnConfig(newest, local, remote, sel, pending)
            keep = self._coverage if self.shared_cache else None  # entries this process still trusts
        return coverage.write(self.path, conns, keep) if conns else False

    def _child_configs(self, name: str) -> dict[str, tuple[Compiled, Compiled]] | None:
        """{child config name: (local, remote) configured selectors} of connection ``name``."""

        def once() -> dict[str, tuple[Compiled, Compiled]] | None:
            try:
                return self._child_configs_once(name)
            except parse.GarbledSelectorError:
                self._forget_conn(name)  # fetched again by the next try
                raise

        return _read_again(once, f"connection {name}")

    def _child_configs_once(self, name: str) -> dict[str, tuple[Compiled, Compiled]] | None:
        sel = self._cfg_sel.get(name)
        if sel is None:
            conn = self._conn(name)
            if conn is None:
                return None
            sel = self._cfg_sel[name] = _conn_selectors(conn)
        return sel

    def _candidates(self, ike: _Ike, flow: Flow) -> set[str] | None:
        """Child config names of ``ike``'s connection that could cover ``flow`` (None: no config)."""
        la, ra = normalize_address(flow.local_addr), normalize_address(flow.remote_addr)
        if LIBRARY_CONN.fullmatch(ike.name):  # one child, host to host: no configuration needed
            sec = ike.section
            hosts = (parse.text(sec.get("local-host", b""), "host"), parse.text(sec.get("remote-host", b""), "host"))
            try:
                same = (
                    normalize_address(ipaddress.ip_address(hosts[0])) == la
                    and normalize_address(ipaddress.ip_address(hosts[1])) == ra
                )
            except ValueError:
                same = False
            return {ike.name} if same else set()
        configs = self._child_configs(ike.name)
        if configs is None:
            return None
        lkey, rkey = (la.version, int(la)), (ra.version, int(ra))
        return {
            cname
            for cname, (lsel, rsel) in configs.items()
            if _match(lsel, lkey, flow.proto, flow.local_port) and _match(rsel, rkey, flow.proto, flow.remote_port)
        }

    def _list_child(self, uid: str, cname: str) -> None:
        """Replace what the index holds of child config ``cname`` in IKE_SA ``uid`` by charon's view."""
        _read_again(lambda: self._list_child_once(uid, cname), f"CHILD_SAs {cname} of IKE_SA {uid}")

    def _list_child_once(self, uid: str, cname: str) -> None:
        self.lazy_listings += 1
        entries = self.session.list_sas(ike_id=uid, child=cname)
        ike = self._ikes.get(uid)
        if not entries:
            self._drop_ike(uid)
            return
        for entry in entries:
            name, sec = parse.single_section(entry, "list-sas entry")
            if parse.uniqueid(sec) != uid:
                continue
            kids = parse.children_of(sec)
            ike = self._upsert(name, sec)
            for cid, child in list(ike.children.items()):
                if child.name == cname and cid not in kids:
                    self._remove_child(ike, cid)
            for child in kids.values():
                self._add_child(ike, child)
            ike.fetched.add(cname)

    def _list_whole(self, uid: str) -> None:
        """List IKE_SA ``uid`` with all its CHILD_SAs (no config to go by)."""
        _read_again(lambda: self._list_whole_once(uid), f"IKE_SA {uid}")

    def _list_whole_once(self, uid: str) -> None:
        self.lazy_listings += 1
        ike = self._ikes.get(uid)
        entries = self.session.list_sas(ike_id=uid)
        if entries:
            name, sec = parse.single_section(entries[0], "list-sas entry")
            ike = self._upsert(name, sec)
            self._set_children(ike, parse.children_of(sec))
            ike.complete = True
        elif ike is not None and not self.session.list_sas(ike_id=uid, child=NO_CHILD):
            self._drop_ike(uid)
        elif ike is not None:
            ike.complete = True  # over the message limit and no config: events are all we get

    def _fill(self, flow: Flow) -> bool:
        """List, for every partial IKE_SA, the child configs that could cover ``flow`` not listed yet."""
        key = (flow.proto, flow.local_addr, flow.local_port, flow.remote_addr, flow.remote_port)
        if key in self._checked:
            return False
        did = False
        for uid, ike in list(self._ikes.items()):
            if ike.complete:
                continue
            names = self._cached_candidates(ike, flow)
            if names is None:
                names = self._candidates(ike, flow)
            if names is None:
                self._list_whole(uid)
                did = True
                continue
            for cname in sorted(names - ike.fetched):
                self._list_child(uid, cname)
                did = True
        if len(self._checked) >= MAX_CHECKED:
            self._checked.clear()
        self._checked.add(key)
        return did

    def complete_all(self) -> None:
        """List every CHILD_SA of every partial IKE_SA (for a full snapshot)."""
        for uid, ike in list(self._ikes.items()):
            if ike.complete:
                continue
            configs = self._child_configs(ike.name)
            if configs is None:
                self._list_whole(uid)
                continue
            for cname in sorted(set(configs) - ike.fetched):
                if uid in self._ikes:
                    self._list_child(uid, cname)
            if uid in self._ikes:
                self._ikes[uid].complete = True

    # -- queries -------------------------------------------------------------------------------
    def _identities(self, ike: _Ike) -> tuple[Identity, Identity]:
        cached = self._cached(ike)
        auth: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]
        if cached is not None:
            auth = (cached.local, cached.remote)
        else:
            conn = self._conn(ike.name)
            auth = (None, None) if conn is None else (parse.conn_auth(conn, "local"), parse.conn_auth(conn, "remote"))
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

    def find(self, flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        """The established IKE_SA and installed CHILD_SA covering ``flow`` (most specific first).

        Events already received are applied first (a non-blocking read), and the child
        configs of partial IKE_SAs that could cover the flow are listed once. A negative
        answer, or any answer when ``strict``, is confirmed after a barrier: charon sends an
        SA's child-updown(up) event after answering the initiate that created it, so a
        socket connected right after ``initiate`` returned would otherwise look unprotected.
        (Down events precede the reply to ``terminate``, and a deleted SA's routes are gone
        from the data plane, which the data-plane proof checks independently.)
        """
        with self._lock:
            self.sync()
            self._fill(flow)
            found = None if self.strict else self._find(flow)
            if found is None:
                self.sync(barrier=True)
                self._fill(flow)
                found = self._find(flow)
            if found is None and self._refresh_pending(flow):
                found = self._find(flow)
            if found is None and self._cov_used:  # never a negative answer from the shared cache
                self._drop_coverage()
                self._fill(flow)
                found = self._find(flow)
            elif found is not None and self._cov_used:
                self.cache_hits += 1
            self._cov_used = False
            if found is None and self._confirm_negative(flow):  # a second read differed: answer again
                self._fill(flow)
                found = self._find(flow)
            if self._cache_dirty:
                self.save_coverage()
            if self._warm_due:
                self._warm_due = False
                self._start_warmer()
            return found

    def _refresh_pending(self, flow: Flow) -> bool:
        """Re-list, in IKE_SAs whose last event showed IKE tasks in flight, the child configs
        that could cover ``flow`` (never the whole IKE_SA when its configuration is known).

        charon may answer ``initiate`` (or ``rekey``) before it raises the matching
        child-updown/child-rekey event; the tasks it was running then are in the event's
        ``tasks-active``. Listing such an IKE_SA's candidates (``list-sas ike-id child``)
        replaces their state with charon's current one, which has no tasks left once they completed.
        """
        pending = [uid for uid, ike in self._ikes.items() if ike.section.get("tasks-active")]
        for uid in pending:
            ike = self._ikes.get(uid)
            if ike is None:
                continue
            names = self._candidates(ike, flow)
            if names is None:
                self._list_whole(uid)
                continue
            if not names:  # nothing could cover the flow: just refresh the IKE section
                names = {NO_CHILD}
            for cname in sorted(names):
                if uid in self._ikes:
                    self._list_child(uid, cname)
        return bool(pending)

    def _find(self, flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        t = self._tables
        ra, la = normalize_address(flow.remote_addr), normalize_address(flow.local_addr)
        proto, lport, rport = flow.proto, flow.local_port, flow.remote_port
        lkey, rkey = (la.version, int(la)), (ra.version, int(ra))
        for bucket in (
            t.by_remote.get((ra, proto, rport), ()),
            t.by_local.get((la, proto, lport), ()),
            t.by_raddr.get(ra, ()),
            t.wide,
        ):
            for uid, child, lsel, rsel, _ in bucket:
                if _match(lsel, lkey, proto, lport) and _match(rsel, rkey, proto, rport):
                    ike = self._record(uid)
                    if not ike.is_established:
                        continue
                    if self._confirmed.get((uid, child.uniqueid)) is not child:
                        self._confirm(uid, child)
                        return self._find(flow)  # the index may have changed: match again
                    return ike, child
        return None

    def _confirm(self, uid: str, child: ChildSA) -> None:
        """Read CHILD_SA ``child``'s selectors from charon again before they first cover a flow.

        charon formats traffic selectors with getprotobynumber() and getservbyport(), which are
        not reentrant: a listing or event built while another connection's listing is built
        (another process, ``swanctl``) can name another protocol or port than the SA's, a valid
        and wrong selector (measured: 9 of 24,000 selectors of two concurrent listings said udp
        for tcp or back; README "strongSwan" under Backends). So the selectors a positive
        answer rests on are those of two listings that agree: this one (``list-sas`` of that
        child alone) and the one the index holds. If they differ, the fresh one replaces it and
        must be confirmed in turn; after :data:`CONFIRM_TRIES` disagreeing reads, EPROTO. When they
        agree but the second read is no longer INSTALLED (DELETING: its down event still to come),
        the second read holds: no positive answer rests on the older state.
        """
        for _ in range(CONFIRM_TRIES):
            self.confirm_listings += 1
            fresh = _read_again(functools.partial(self._read_child, uid, child.uniqueid), f"CHILD_SA {child.uniqueid}")
            ike = self._ikes.get(uid)
            if fresh is None or ike is None:  # gone meanwhile
                if ike is not None:
                    self._remove_child(ike, child.uniqueid)
                return
            if fresh.local_ts == child.local_ts and fresh.remote_ts == child.remote_ts:
                if len(self._confirmed) >= MAX_CONFIRMED:
                    self._confirmed.clear()
                if fresh.installed != child.installed:  # the newer read says it is going (or back): it holds
                    self._add_child(ike, fresh)
                    child = fresh
                self._confirmed[(uid, child.uniqueid)] = child
                self._unconfirmed.discard((uid, child.uniqueid))
                return
            log.warning(
                "charon listed CHILD_SA %s with selectors %s === %s, then %s === %s: reading it again",
                child.uniqueid,
                child.local_ts,
                child.remote_ts,
                fresh.local_ts,
                fresh.remote_ts,
            )
            self._add_child(ike, fresh)
            child = fresh
        raise ProtocolError(
            f"charon listed CHILD_SA {child.uniqueid} with different traffic selectors {CONFIRM_TRIES} times "
            "(concurrent VICI listings garble them: README, Backends, strongSwan)"
        )

    def _read_child(self, uid: str, cid: str) -> ChildSA | None:
        """CHILD_SA ``cid`` of IKE_SA ``uid`` as charon lists it now (None: gone)."""
        for entry in self.session.list_sas(ike_id=uid, child_id=cid):
            _name, sec = parse.single_section(entry, "list-sas entry")
            if parse.uniqueid(sec) == uid:
                return parse.children_of(sec).get(cid)
        return None

    def _confirm_negative(self, flow: Flow) -> bool:
        """Before a negative answer stands, read once more what it rests on (see :meth:`_confirm`):
        the configurations that named the candidate child configs, and the CHILD_SAs read only once,
        of every IKE_SA whose selectors' addresses cover the flow (charon garbles protocols and
        ports, never addresses). True when a second read differed (the caller answers again)."""
        la, ra = normalize_address(flow.local_addr), normalize_address(flow.remote_addr)
        lkey, rkey = (la.version, int(la)), (ra.version, int(ra))
        changed = False
        for name in sorted(self._cfg_unconfirmed):
            sel = self._cfg_sel.get(name)  # None: its selectors never named candidates (read for identities)
            if sel is not None and any(_addr_in(ls, lkey) and _addr_in(rs, rkey) for ls, rs in sel.values()):
                changed |= self._confirm_config(name)
        for uid, cid in sorted(self._unconfirmed):
            ike = self._ikes.get(uid)
            child = ike.children.get(cid) if ike is not None else None
            if ike is None or child is None:
                self._unconfirmed.discard((uid, cid))
                continue
            if _addr_in(_compiled(child.local_ts), lkey) and _addr_in(_compiled(child.remote_ts), rkey):
                self._confirm(uid, child)
                changed |= self._ikes.get(uid) is not ike or ike.children.get(cid) is not child
        if changed:
            self._checked.clear()
        return changed

    def _confirm_config(self, name: str) -> bool:
        """Read connection ``name``'s configured selectors a second time; True when they differed
        (the second read replaces the first and is confirmed in turn). EPROTO after CONFIRM_TRIES."""
        for attempt in range(CONFIRM_TRIES):
            first = self._child_configs(name)
            self.confirm_listings += 1
            conn = _fetch_conn(self.session, name)
            self._cfg_sel.pop(name, None)
            self._conns[name] = conn
            self._cache_dirty = True
            second = self._child_configs(name) if conn is not None else None
            if first == second:
                self._cfg_unconfirmed.discard(name)
                return attempt > 0
            log.warning("charon listed connection %s with other selectors on a second read: reading it again", name)
        raise ProtocolError(
            f"charon listed connection {name!r} with different traffic selectors {CONFIRM_TRIES} times "
            "(concurrent VICI listings garble them: README, Backends, strongSwan)"
        )

    def stamp(self) -> tuple[int, int]:
        """(resyncs, generation) after applying every event charon has sent so far: an answer
        computed at one stamp holds while the stamp is unchanged (btnsd's answer cache)."""
        with self._lock:
            self.sync()
            return self.resyncs, self.generation

    def child_ids(self) -> dict[str, set[str]]:
        """{IKE_SA uniqueid: CHILD_SA uniqueids} as the index holds them now (no sync)."""
        with self._lock:
            return {uid: set(ike.children) for uid, ike in self._ikes.items()}

    def snapshot(self) -> list[IkeSA]:
        """Every IKE_SA the index holds, as records (partial IKE_SAs are listed completely first)."""
        with self._lock:
            self.sync()
            self.complete_all()
            return [self._record(uid) for uid in list(self._ikes)]


def _child_count(conn: Mapping[str, Any] | None) -> int:
    children = conn.get("children") if conn is not None else None
    return len(children) if isinstance(children, Mapping) else 0


def _fetch_conn(session: ViciSession, name: str) -> Mapping[str, Any] | None:
    """Connection ``name``'s list-conns section (None: charon has no such connection)."""
    conn = next((c[name] for c in session.list_conns(name) if name in c), None)
    if conn is not None and not isinstance(conn, Mapping):
        raise ProtocolError(f"list-conns entry {name!r} is not a section")
    return conn


def _conn_selectors(conn: Mapping[str, Any]) -> dict[str, tuple[Compiled, Compiled]]:
    """{child config name: (local, remote) configured selectors} of one list-conns section."""
    children = conn.get("children") or {}
    if not isinstance(children, Mapping):
        raise ProtocolError("list-conns children is not a section")
    sel = {}
    for cname, cfg in children.items():
        if not isinstance(cfg, Mapping):
            raise ProtocolError("list-conns child is not a section")
        sel[cname] = (_cfg_compiled(cfg, "local-ts"), _cfg_compiled(cfg, "remote-ts"))
    return sel


def _read_again(read: Callable[[], T], what: str) -> T:
    """``read()``, again (up to CONFIRM_TRIES times) while charon's listing has a garbled selector."""
    for attempt in range(1, CONFIRM_TRIES + 1):
        try:
            return read()
        except parse.GarbledSelectorError as exc:
            if attempt == CONFIRM_TRIES:
                raise
            log.warning("charon listed %s with a garbled selector (%s): reading it again", what, exc)
    raise AssertionError("unreachable")  # pragma: no cover


def _addr_in(sel: Compiled, key: tuple[int, int]) -> bool:
    """Some selector of ``sel`` covers the address ``key`` (version, integer), whatever protocol and ports."""
    version, addr = key
    return any(s[0] == version and s[1] <= addr <= s[2] for s in sel)


def _breadth(child: ChildSA) -> int:
    """How much a CHILD_SA's selectors cover: narrower ones match first, like an SPD."""
    total = 0
    for t in child.local_ts + child.remote_ts:
        total += (int(t.end) - int(t.start) + 1) * (t.port_hi - t.port_lo + 1) * (256 if t.proto == 0 else 1)
    return total
