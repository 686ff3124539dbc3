"""charon's SAs as records, fresh: list-sas, list-conns and list-certs over one VICI session.

What the backend's ``btns_list_sas`` hook answers (:meth:`.plugin.Context.list_sas`), in a module
of its own so that ``btns sas`` of the built-in backend needs neither the plugin manager nor the
enforcement, event and data-plane modules the plugin imports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..core.errors import ProtocolError
from ..core.records import ChildSA, IkeSA
from . import coverage, parse
from .compiled import compiled, config_selectors
from .session import DEFAULT_SOCKET, ViciSession


def socket_path(options: Mapping[str, str]) -> str:
    """Option ``vici_socket``, else ``$BTNS_VICI_SOCKET``, else charon's default."""
    return options.get("vici_socket") or os.environ.get("BTNS_VICI_SOCKET") or DEFAULT_SOCKET


def list_records(
    session: ViciSession,
    *,
    ike: str | None = None,
    ike_id: str | None = None,
    child: str | None = None,
    child_id: str | None = None,
    cache: bool = True,
) -> list[IkeSA]:
    """Every IKE_SA with its CHILD_SAs (by uniqueid) and both ends' identities.

    The identities' auth methods are each connection's auth rounds (``list-conns``); with
    ``cache`` they come from the coverage cache shared with the SA index (:mod:`.coverage`) when
    it holds every listed IKE_SA's connection, valid for that IKE_SA (not newer than the cached
    configuration), and else are fetched and written there for the next listing: charon builds
    list-conns at ~0.06 ms per child config (60 ms at 1,000), as long as list-sas itself.

    The filters are list-sas's (``swanctl --list-sas --ike`` ...): charon lists only those IKE_SAs
    and CHILD_SAs, so a filtered listing costs what it shows. charon reads a non-numeric id as no
    filter and keeps IKE_SAs left without children: callers that need exact selection still select.
    """
    filters = {"ike_id": ike_id, "child_id": child_id, "ike": ike, "child": child}
    first = [parse.single_section(e, "list-sas entry") for e in session.list_sas(**filters)]
    got = _cached_configs(session.path, first) if cache else None
    if got is None:
        conns: dict[str, Any] = {}
        for c in session.list_conns(ike):
            conns.update(c)
        got = _fetched_configs(conns)
        if cache:
            _remember(session.path, conns, first)
    auth, configured = got

    def agrees(name: str, kid: ChildSA) -> bool:  # a second, independent read of its selectors
        want = configured.get(name, {}).get(kid.name)
        return want is not None and want == (compiled(kid.local_ts), compiled(kid.remote_ts))

    sas, kids_of = confirmed_sas(session, first=first, agrees=agrees, **filters)
    store = parse.CertStore.from_vici(session.list_certs())
    out = []
    for name, sec in sas:
        lauth, rauth = auth.get(name, (None, None))
        local = parse.identity(parse.text(sec.get("local-id", b"")), lauth, store)
        remote = parse.identity(parse.text(sec.get("remote-id", b"")), rauth, store)
        kids = sorted(kids_of[parse.uniqueid(sec)].values(), key=lambda c: int(c.uniqueid))
        out.append(parse.parse_ike(name, sec, local, remote, kids))
    return out


#: Listings of the SAs after which a CHILD_SA whose selectors no two of them agree on is EPROTO.
READ_TRIES = 4


def confirmed_sas(
    session: ViciSession,
    first: list[tuple[str, Any]] | None = None,
    agrees: Callable[[str, ChildSA], bool] | None = None,
    **filters: str | None,
) -> tuple[list[tuple[str, Any]], dict[str, dict[str, ChildSA]]]:
    """list-sas (``filters`` as :meth:`.ViciSession.list_sas`) until every CHILD_SA of the last
    listing has traffic selectors two listings agree on: ([(IKE_SA name, section)], {IKE_SA
    uniqueid: {CHILD_SA uniqueid: ChildSA}}), the sections of the last listing.

    charon formats selectors with getprotobynumber() and getservbyport(), which are not reentrant:
    a listing built while another VICI connection's is (another process, ``swanctl``) can name
    another valid protocol or port ("domain" for "http", udp for tcp) or a garbled one (README
    "Backends", strongSwan). So, as in the SA index (:meth:`.index.SAIndex._confirm`), a CHILD_SA's
    selectors are those two reads agree on (a garbled read counts as none), except for selectors
    without a protocol (nothing looked up, nothing garbled: see :func:`_children`). A listing whose
    CHILD_SAs all have such selectors (or none) is taken at once; otherwise, without contention,
    it costs two list-sas. EPROTO when a CHILD_SA still lacks two agreeing reads after
    :data:`READ_TRIES` listings.

    ``first``: a listing already made (the first read); ``agrees(IKE_SA name, child)``: True when
    another read of charon's agrees with the child's selectors (its child config's configured
    selectors, read by list-conns, equal its negotiated ones: what most per-port children have),
    which confirms it without a second list-sas.
    """
    votes: dict[tuple[str, str], dict[Any, ChildSA]] = {}  # CHILD_SA -> {selectors: the latest read of them}
    confirmed: dict[tuple[str, str], ChildSA] = {}
    for attempt in range(READ_TRIES):
        if attempt == 0 and first is not None:
            sas = first
        else:
            sas = [parse.single_section(e, "list-sas entry") for e in session.list_sas(**filters)]
        kids_of: dict[str, dict[str, ChildSA]] = {}
        pending: list[tuple[str, str]] = []
        for name, sec in sas:
            uid = parse.uniqueid(sec)
            kids = kids_of.setdefault(uid, {})
            for cid, (child, plain) in _children(sec).items():
                key = (uid, cid)
                if child is not None and plain:
                    confirmed[key] = child  # no protocol, so no name charon looked up: nothing to garble
                elif child is not None and key not in confirmed and agrees is not None and agrees(name, child):
                    confirmed[key] = child  # its configuration, read separately, says the same
                elif child is not None:
                    sel = (child.local_ts, child.remote_ts)
                    seen = votes.setdefault(key, {})
                    if sel in seen:
                        confirmed[key] = child
                    seen[sel] = child
                if key in confirmed:
                    kids[cid] = confirmed[key]
                else:
                    pending.append(key)
        if not pending:
            return sas, kids_of
        if attempt:
            _warn("charon listed %d CHILD_SAs' selectors without two agreeing reads: listing again", len(pending))
        if attempt == READ_TRIES - 2 and len(pending) <= LATE_CHILDREN:  # the last read: those few alone
            for uid, cid in pending:
                child, gone = _confirm_alone(session, uid, cid, votes.setdefault((uid, cid), {}))
                if child is not None:
                    confirmed[(uid, cid)] = kids_of[uid][cid] = child
                elif not gone:
                    break
            else:
                return sas, kids_of  # (a CHILD_SA gone meanwhile is not listed)
    raise ProtocolError(
        f"charon listed a CHILD_SA's traffic selectors differently {READ_TRIES} times "
        "(concurrent VICI listings garble them: README, Backends, strongSwan)"
    )


#: CHILD_SAs still without two agreeing reads that are read alone (list-sas ike-id child-id) rather
#: than in one more whole listing (CHILD_SAs that came up or were rekeyed between the listings).
LATE_CHILDREN = 16


def _confirm_alone(session: ViciSession, uid: str, cid: str, seen: dict[Any, ChildSA]) -> tuple[ChildSA | None, bool]:
    """(CHILD_SA ``cid`` once two reads of it agree, None if two more reads of it alone do not;
    whether it is gone)."""
    for _ in range(2):
        found = None
        for entry in session.list_sas(ike_id=uid, child_id=cid):
            _name, sec = parse.single_section(entry, "list-sas entry")
            if parse.uniqueid(sec) == uid:
                found = _children(sec).get(cid)
        if found is None:
            return None, True
        child = found[0]
        if child is not None:
            sel = (child.local_ts, child.remote_ts)
            if sel in seen:
                return child, False
            seen[sel] = child
    return None, False


def _children(sec: Any) -> dict[str, tuple[ChildSA | None, bool]]:
    """An IKE section's CHILD_SAs by uniqueid: (it, None when a selector is garbled; whether every
    selector is a bare address range). charon looks names up only for a selector with a protocol
    (``[tcp/http]``); one without (``10.0.0.2/32``, a host-to-host SA) cannot be garbled, but a
    garbled one can read ``[ip]`` (protocol 0, any): hence the text, not the parsed protocol."""
    kids = sec.get("child-sas", {})
    if not isinstance(kids, Mapping):
        raise ProtocolError("VICI child-sas is not a section")
    out: dict[str, tuple[ChildSA | None, bool]] = {}
    for c in kids.values():
        if not isinstance(c, Mapping):
            raise ProtocolError("VICI child-sas entry is not a section")
        cid = parse.uniqueid(c, "CHILD_SA uniqueid")
        try:
            child: ChildSA | None = parse.parse_child(c)
        except parse.GarbledSelectorError:
            child = None
        plain = all(
            isinstance(ts, list) and all(isinstance(t, bytes) and b"[" not in t for t in ts)
            for ts in (c.get("local-ts", []), c.get("remote-ts", []))
        )
        out[cid] = (child, plain)
    return out


def _warn(msg: str, *args: Any) -> None:
    import logging  # (on use: ``btns sas`` starts without it)

    logging.getLogger(__name__).warning(msg, *args)


Configs = tuple[dict[str, tuple[Any, Any]], dict[str, dict[str, tuple[Any, Any]]]]


def _cached_configs(path: str, sas: list[tuple[str, Any]]) -> Configs | None:
    """({connection: (local, remote) auth round}, {connection: {child config: (local, remote)
    configured selectors}}) from the coverage cache, if it serves every listed IKE_SA."""
    if not sas:
        return None
    cov = coverage.read(path)
    if cov is None:
        return None
    auth: dict[str, tuple[Any, Any]] = {}
    configured: dict[str, dict[str, tuple[Any, Any]]] = {}
    try:
        for name, sec in sas:
            entry = cov.conns.get(name)
            if entry is None or not entry.serves(parse.uniqueid(sec)):
                return None
            auth[name] = (entry.local, entry.remote)
            if name not in configured:
                configured[name] = cov.children_of(name)
    except coverage.Invalid:
        return None
    return auth, configured


def _fetched_configs(conns: Mapping[str, Any]) -> Configs:
    """The same from a list-conns just made (a child config with a garbled selector: none)."""
    auth: dict[str, tuple[Any, Any]] = {}
    configured: dict[str, dict[str, tuple[Any, Any]]] = {}
    for n, c in conns.items():
        if not isinstance(c, Mapping):
            continue
        auth[n] = (parse.conn_auth(c, "local"), parse.conn_auth(c, "remote"))
        kids = c.get("children") or {}
        sel = configured[n] = {}
        if isinstance(kids, Mapping):
            for cname, cfg in kids.items():
                if isinstance(cfg, Mapping):
                    with contextlib.suppress(ProtocolError):
                        sel[cname] = (config_selectors(cfg, "local-ts"), config_selectors(cfg, "remote-ts"))
    return auth, configured


def _remember(path: str, conns: Mapping[str, Any], sas: list[tuple[str, Any]]) -> None:
    """Write the connections just fetched to the coverage cache (selectors and auth rounds), as the
    SA index does (:meth:`.index.SAIndex.save_coverage`): valid for the IKE_SAs listed before."""
    newest, pending = coverage.known_ikes(sas)
    fresh: dict[str, coverage.ConnConfig] = {}
    for name, conn in conns.items():
        if not isinstance(conn, Mapping) or coverage.LIBRARY_CONN.fullmatch(name):
            continue
        children = conn.get("children") or {}
        try:
            if not isinstance(children, Mapping) or not all(isinstance(c, Mapping) for c in children.values()):
                continue
            sel = {
                cname: (config_selectors(cfg, "local-ts"), config_selectors(cfg, "remote-ts"))
                for cname, cfg in children.items()
            }
        except ProtocolError:
            continue  # (a garbled selector: not cached; the index fetches it itself)
        local, remote = parse.conn_auth(conn, "local"), parse.conn_auth(conn, "remote")
        fresh[name] = coverage.ConnConfig(newest, local, remote, sel, pending)
    if fresh:
        coverage.write(path, fresh, coverage.read(path))
