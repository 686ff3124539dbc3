"""``btns sockets``: every TCP and UDP socket with its IPsec protection (the ``ss`` of IPsec)."""

from __future__ import annotations

import bisect
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from ..core.records import NotCarried
from ..core.selectors import normalize_address
from . import exits
from .context import BUILTIN, list_sas, open_backend
from .describe import PROTO_NAMES, entry_view, protection_cells, protection_dict, ptoken_dict
from .output import table
from .sockdiag import HoldersSoon, SocketEntry, list_sockets
from .ssfilter import LISTENING, FilterError, Selection, parse

if TYPE_CHECKING:
    from ..backend import Backend
    from ..core.records import IkeSA, Protection, SocketView
    from ..core.selectors import Flow, IPAddress
    from .pidfd import SocketBorrower


HEADERS = ("PROTO", "STATE", "LOCAL", "PEER", "PROCESS", "PROTECTION", "SPI-IN/OUT", "MODE", "ALG", "PEER-ID", "AUTH")


def status_of(entry: SocketEntry, protected: bool) -> str:
    """protected | clear | listening | unconnected"""
    if entry.flow is not None:
        return "protected" if protected else "clear"
    return "listening" if entry.state == "LISTEN" else "unconnected"


def endpoint(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class Snapshot:
    """The protection of many sockets from one SA listing (what a listing of 10,000 sockets needs).

    The SAs are listed once; a flow no installed CHILD_SA of that listing covers is clear
    without asking the backend again (as ``ss`` shows one instant, so does this; an SA that
    appears meanwhile shows on the next run). A covered flow gets the socket-exact proof
    (``backend.protect``) for THAT socket: read through a process holding it (pidfd_getfd: the
    socket itself, every routing key) when we may, else as sock_diag shows it (device, mark, uid).

    ``Snapshot(backend)`` lists through ``backend``; ``Snapshot(None, sas, opener, name)`` takes
    a listing made without it (:func:`.context.list_sas`) and opens the backend only when a
    flow is covered: a host where nothing is protected never loads the plugin machinery.
    """

    def __init__(
        self,
        backend: Backend | None,
        sas: list[IkeSA] | None = None,
        opener: Callable[[], Backend] | None = None,
        name: str | None = None,
    ) -> None:
        self._backend = backend
        self._opener = opener
        listed = backend.list_sas() if sas is None and backend is not None else (sas or [])
        self.sas = [ike for ike in listed if ike.is_established]
        self.name = name or (backend.name if backend is not None else "?")
        self._reach = _Reach(self.sas)
        self._clear_template: dict[str, Any] | None = None
        self._borrower: SocketBorrower | None = None
        self._text: dict[int, tuple[Any, str]] = {}  # id(address) -> (it, str(it)): sockets share addresses

    def text(self, addr: Any) -> str:
        """``str(addr)``, once per address object (ipaddress formats in pure Python)."""
        known = self._text.get(id(addr))
        if known is not None and known[0] is addr:
            return known[1]
        text = str(addr)
        self._text[id(addr)] = (addr, text)
        return text

    def flow_text(self, entry: SocketEntry) -> str:
        """``str(entry.flow)`` (core.selectors.Flow.__str__) from the cached address texts."""
        name = PROTO_NAMES.get(entry.proto) or str(entry.proto)
        la, ra = self.text(entry.local_addr), self.text(entry.remote_addr)
        if entry.family == socket.AF_INET6:
            return f"{name} [{la}]:{entry.local_port} -> [{ra}]:{entry.remote_port}"
        return f"{name} {la}:{entry.local_port} -> {ra}:{entry.remote_port}"

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            if self._opener is None:
                raise RuntimeError("Snapshot without a backend")
            self._backend = self._opener()
        return self._backend

    @property
    def borrower(self) -> SocketBorrower:
        """The helper that borrows holders' sockets (started on first use; :meth:`close` stops it)."""
        if self._borrower is None:
            from .pidfd import SocketBorrower

            self._borrower = SocketBorrower()
        return self._borrower

    def close(self) -> None:
        if self._borrower is not None:
            self._borrower.close()
            self._borrower = None

    @property
    def netns_id(self) -> tuple[int, int] | None:
        return self.backend.netns_id

    def covered(self, flow: Flow) -> bool:
        """Some installed CHILD_SA of the listing covers ``flow``."""
        return self._reach.may_cover(flow.remote_addr) and any(ike.child_for(flow) is not None for ike in self.sas)

    def verdict(self, entry: SocketEntry, owners: list[tuple[int, str, int]]) -> tuple[Protection | None, str | None]:
        """(protection, None), or (None, why not) for a covered flow, or (None, None) when nothing covers it."""
        if not entry.connected or not self._reach.may_cover(entry.remote_addr):
            return None, None
        flow = entry.flow
        if flow is None or not self.covered(flow):
            return None, None
        view = exact_view(entry, owners, self.borrower) or entry_view(entry, self.netns_id)
        if view is None:
            return None, None
        found = self.backend.protect(view)
        if isinstance(found, NotCarried):
            return None, f"{found.reason} [socket {view.facts()}]"
        return found, None

    def protection(self, entry: SocketEntry, owners: list[tuple[int, str, int]]) -> Protection | None:
        return self.verdict(entry, owners)[0]

    def ptoken(
        self, flow: Flow, protection: Protection | None, reason: str | None = None, where: str | None = None
    ) -> dict[str, Any]:
        """ptoken_dict of the flow's pToken; for a clear flow from a template (see clear_ptoken_dict;
        ``where``: ``str(flow)`` when the caller has it)."""
        from ..core.derive import ptoken_for, unprotected_ptoken

        if protection is not None:
            return ptoken_dict(ptoken_for(protection))
        if reason is not None:
            return ptoken_dict(unprotected_ptoken(flow, reason))
        return clear_ptoken_dict(self.clear_template(), flow, where)

    def clear_template(self) -> dict[str, Any]:
        """ptoken_dict of the flow-less clear pToken (see clear_ptoken_dict), made once."""
        if self._clear_template is None:
            from ..core.derive import unprotected_ptoken

            self._clear_template = ptoken_dict(unprotected_ptoken(None, clear_reason(self.name)))
        return self._clear_template


class _Reach:
    """The remote addresses the installed CHILD_SAs' remote traffic selectors span, merged and
    sorted: a flow whose peer lies outside is covered by none of them (found by bisection, so
    10,000 sockets beside 1,000 SAs are not 10 million selector checks). A superset: inside,
    ``IkeSA.child_for`` decides."""

    def __init__(self, sas: list[IkeSA]) -> None:
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for ike in sas:
            for child in ike.children:
                if child.installed:
                    for ts in child.remote_ts:
                        spans[ts.version].append((int(ts.start), int(ts.end)))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, ranges in spans.items():
            merged: list[list[int]] = []
            for lo, hi in sorted(ranges):
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            self._starts[version] = [lo for lo, _ in merged]
            self._ends[version] = [hi for _, hi in merged]
        self._seen: dict[int, tuple[IPAddress, bool]] = {}  # id(address) -> (it, answer): sockets share them

    def may_cover(self, addr: IPAddress) -> bool:
        seen = self._seen.get(id(addr))
        if seen is not None and seen[0] is addr:
            return seen[1]
        seen_as = normalize_address(addr)  # ::ffff:a.b.c.d is matched as a.b.c.d (core.selectors.flow_covered)
        value = int(seen_as)
        i = bisect.bisect_right(self._starts[seen_as.version], value) - 1
        answer = i >= 0 and value <= self._ends[seen_as.version][i]
        self._seen[id(addr)] = (addr, answer)
        return answer


def exact_view(entry: SocketEntry, owners: list[tuple[int, str, int]], borrower: SocketBorrower) -> SocketView | None:
    """The socket read through one of its holders' descriptors (pidfd_getfd, by ``borrower``: only
    that very socket ever reaches this process, never whatever file its holder put at that number
    meanwhile), None if none may be taken."""
    for pid, _comm, fd in owners:
        try:
            num = borrower.borrow(pid, fd, entry.inode)
        except OSError:
            continue
        try:
            from ..sockets import view_of

            return view_of(num)
        except OSError:
            continue
        finally:
            os.close(num)
    return None


def clear_reason(backend: Backend | str) -> str:
    """The reason protection.verify_flow gives for a flow nothing protects (``backend``: it or its name)."""
    name = backend if isinstance(backend, str) else backend.name
    return f"no CHILD_SA verified in both {name} and the data plane covers it"


def clear_ptoken_dict(template: dict[str, Any], flow: Flow | None, where: str | None = None) -> dict[str, Any]:
    """``ptoken_dict(unprotected_ptoken(flow, reason))`` from the flow-less one: only the two strings
    naming the flow differ (tests/unit/test_cli_sockets_fast.py holds them equal). ``where``: ``str(flow)``."""
    if where is None:
        where = str(flow)
    d = dict(template)
    d["auditString"] = template["auditString"].replace("flow=this socket", f"flow={where}", 1)
    d["informationString"] = template["informationString"].replace("this socket", where, 1)
    return d


def describe(
    entry: SocketEntry, snapshot: Snapshot, owners: list[tuple[int, str, int]], with_token: bool = True
) -> tuple[Protection | None, dict[str, Any]]:
    """One socket: sock_diag facts, its processes, and for a connected one its verified protection
    and (``with_token``) pToken."""
    protection, reason, d = facts(entry, snapshot, owners)
    flow = entry.flow
    if flow is not None and with_token:
        d["ptoken"] = snapshot.ptoken(flow, protection, reason, snapshot.flow_text(entry))
    return protection, d


def facts(
    entry: SocketEntry, snapshot: Snapshot, owners: list[tuple[int, str, int]]
) -> tuple[Protection | None, str | None, dict[str, Any]]:
    """(protection, why a covered flow is not protected, :func:`describe`'s dict with ``ptoken`` None,
    its last key)."""
    flow = entry.flow
    protection, reason = snapshot.verdict(entry, owners)
    local, remote, proto = snapshot.text(entry.local_addr), snapshot.text(entry.remote_addr), PROTO_NAMES[entry.proto]
    return (
        protection,
        reason,
        {
            "proto": proto,
            "family": 4 if entry.family == socket.AF_INET else 6,
            "state": entry.state,
            "local_addr": local,
            "local_port": entry.local_port,
            "remote_addr": remote,
            "remote_port": entry.remote_port,
            "inode": entry.inode,
            "uid": entry.uid,
            "processes": [{"pid": pid, "comm": comm, "fd": fd} for pid, comm, fd in owners],
            "status": status_of(entry, protection is not None),
            "flow": None
            if flow is None  # flow_dict(flow), from the texts above
            else {
                "proto": proto,
                "local_addr": local,
                "local_port": entry.local_port,
                "remote_addr": remote,
                "remote_port": entry.remote_port,
            },
            "protection": protection_dict(protection) if protection is not None else None,
            "ptoken": None,
        },
    )


def quoted(comm: str) -> str:
    """A process name inside the PROCESS cell's quotes: ``"`` and ``\\`` escaped, so a name (any 15
    bytes its owner chose) cannot close the quotes and forge another holder; control characters are
    escaped by :func:`.output.table` for the whole line."""
    return comm.replace("\\", "\\\\").replace('"', '\\"') if '"' in comm or "\\" in comm else comm


def users(processes: list[dict[str, Any]]) -> str:
    """The PROCESS cell as ``ss -p`` prints it: users:(("name",pid=P,fd=N),...)."""
    if not processes:
        return ""
    return "users:(" + ",".join(f'("{quoted(p["comm"])}",pid={p["pid"]},fd={p["fd"]})' for p in processes) + ")"


def row(entry: SocketEntry, protection: Protection | None, d: dict[str, Any]) -> list[Any]:
    procs = users(d["processes"])
    if entry.flow is None:
        return [d["proto"], entry.state, endpoint(entry.local_addr, entry.local_port), "*", procs, d["status"]]
    return [
        d["proto"],
        entry.state,
        endpoint(entry.local_addr, entry.local_port),
        endpoint(entry.remote_addr, entry.remote_port),
        procs,
        *protection_cells(protection),
    ]


class _Rows:
    """Table rows straight from the entries (no per-socket dict): what ``row(*describe(...))`` gives."""

    def __init__(self, snapshot: Snapshot, holders: dict[int, list[tuple[int, str, int]]]) -> None:
        self.snapshot = snapshot
        self.holders = holders
        self._addr: dict[int, tuple[Any, str]] = {}  # id(address) -> (it, text): ipaddress hashes slowly

    def host(self, addr: Any) -> str:
        known = self._addr.get(id(addr))
        if known is not None and known[0] is addr:
            return known[1]
        text = f"[{addr}]" if addr.version == 6 else str(addr)
        self._addr[id(addr)] = (addr, text)
        return text

    def __call__(self, e: SocketEntry) -> list[str]:
        """The row's cells, each a non-empty str ("-" for none: ``table(..., cells_ready=True)``)."""
        held = self.holders.get(e.inode)
        procs = "users:(" + ",".join(f'("{quoted(c)}",pid={p},fd={fd})' for p, c, fd in held) + ")" if held else "-"
        local = f"{self.host(e.local_addr)}:{e.local_port}"
        if not e.connected:
            return [PROTO_NAMES[e.proto], e.state, local, "*", procs, status_of(e, False)]
        protection = self.snapshot.protection(e, held or [])
        cells = _CLEAR if protection is None else [c or "-" for c in protection_cells(protection)]
        return [PROTO_NAMES[e.proto], e.state, local, f"{self.host(e.remote_addr)}:{e.remote_port}", procs, *cells]


#: protection_cells(None) as the table prints it
_CLEAR = ("clear", "-", "-", "-", "-", "-")


def emit_array(items: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """A JSON array with one socket per line: the dicts are plain JSON values already, so the C
    encoder does the work (an indented dump goes through json's pure-Python encoder: 4x slower)."""
    emit_lines(list(map(_encoder(), items)), out)


def emit_lines(lines: list[str], out: TextIO | None = None) -> None:
    """:func:`emit_array` of items already encoded, one per line."""
    out = out or sys.stdout
    out.write("[\n  " + ",\n  ".join(lines) + "\n]\n" if lines else "[]\n")
    out.flush()


def _encoder() -> Callable[[Any], str]:
    import json  # (on use: a table needs no JSON)

    return json.JSONEncoder(separators=(", ", ": ")).encode


class _Lines:
    """The lines of ``emit_array([describe(e, ...)[1] for e in entries])``, each socket encoded once.

    The pToken of a flow nothing covers (nearly every socket of a big listing) is the clear
    template's JSON text with the flow's text spliced in where clear_ptoken_dict puts it (JSON
    escapes character by character: the escaped flow text is what encoding the whole string gives),
    not a dict copied and encoded again per socket. tests/unit/test_cli_fast_listing.py holds the
    lines equal to emit_array's.
    """

    MARK = "\x00btns-flow\x00"  # (no pToken text holds a NUL)

    def __init__(self, snapshot: Snapshot, holders: dict[int, list[tuple[int, str, int]]]) -> None:
        self.snapshot = snapshot
        self.holders = holders
        self.encode = _encoder()
        self._pieces: list[str] | None = None

    def clear_token(self, where: str) -> str:
        """``encode(snapshot.ptoken(flow, None))`` for a flow whose text is ``where``."""
        if self._pieces is None:
            marked = clear_ptoken_dict(self.snapshot.clear_template(), None, self.MARK)
            self._pieces = self.encode(marked).split(self.encode(self.MARK)[1:-1])
        return self.encode(where)[1:-1].join(self._pieces)

    def __call__(self, e: SocketEntry) -> str:
        snap = self.snapshot
        protection, reason, d = facts(e, snap, self.holders.get(e.inode, []))
        text = self.encode(d)
        flow = e.flow
        if flow is None:
            return text
        where = snap.flow_text(e)
        if protection is None and reason is None:
            token = self.clear_token(where)
        else:
            token = self.encode(snap.ptoken(flow, protection, reason, where))
        return text[: -len("null}")] + token + "}"  # the dict ends with "ptoken": null


def selection(args: Any) -> tuple[Selection, set[int] | None, set[int] | None]:
    """The ss-style options and FILTER words -> (selection, protocols, families); CliError(USAGE) if bad."""
    try:
        sel = parse(getattr(args, "filter", None) or [], LISTENING if getattr(args, "listening", False) else None)
    except FilterError as exc:
        raise exits.CliError(exits.USAGE, f"bad filter: {exc}") from None
    protocols = {
        p for flag, p in (("tcp", socket.IPPROTO_TCP), ("udp", socket.IPPROTO_UDP)) if getattr(args, flag, False)
    } or None
    families: set[int] | None = {
        f for flag, f in (("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6)) if getattr(args, flag, False)
    } or None
    return sel, protocols, families


def _broker(args: Any) -> Any:
    """btnsd, for a caller without root that names no backend of its own (README "btnsd"), else None."""
    if os.geteuid() == 0 or args.backend or args.vici_socket or args.netns:
        return None
    from ..broker.client import BrokerClient
    from ..broker.policy import DEFAULT_SOCKET

    path = os.environ.get("BTNS_BROKER") or (DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None)
    return BrokerClient(path) if path else None


def _entry_of(d: dict[str, Any]) -> SocketEntry:
    return SocketEntry(
        proto=socket.IPPROTO_TCP if d["proto"] == "tcp" else socket.IPPROTO_UDP,
        family=socket.AF_INET if d["family"] == 4 else socket.AF_INET6,
        state=d["state"],
        local_addr=ipaddress.ip_address(d["local_addr"]),
        local_port=d["local_port"],
        remote_addr=ipaddress.ip_address(d["remote_addr"]),
        remote_port=d["remote_port"],
        inode=d["inode"],
        uid=d["uid"],
    )


def _cells_of(d: dict[str, Any]) -> list[Any]:
    """Table cells from a socket's dict (what btnsd answers): as protection_cells gives them."""
    p = d["protection"]
    if p is None:
        return ["clear", "", "", "", "", ""] if d["flow"] is not None else [d["status"]]
    return [
        p["sa"],
        f"{p['spi_in']}/{p['spi_out']}",
        f"{p['protocol']}/{p['mode']}".lower(),
        p["algorithms"],
        p["peer_id"],
        p["auth_method"],
    ]


def run_via_broker(args: Any, broker: Any) -> int:
    """The listing btnsd makes for us (it reads every socket as root would, the processes only ours)."""
    sel, protocols, families = selection(args)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here:  # names our namespace to btnsd
        dicts = broker.sockets(here)
    kept = []
    for d in dicts:
        e = _entry_of(d)
        if (protocols and e.proto not in protocols) or (families and e.family not in families):
            continue
        if (sel.states is not None and e.state not in sel.states) or (sel.predicate and not sel.predicate(e)):
            continue
        if args.connected and not e.connected:
            continue
        kept.append((e, d))
    if args.json:
        emit_array([d for _, d in kept])
    else:
        rows = []
        for e, d in kept:
            local = endpoint(e.local_addr, e.local_port)
            peer = endpoint(e.remote_addr, e.remote_port) if e.flow is not None else "*"
            rows.append([d["proto"], e.state, local, peer, users(d["processes"]), *_cells_of(d)])
        table(HEADERS, rows)
    return exits.OK


def _snapshot(args: Any) -> Snapshot:
    """The SA listing of the selected backend; the backend itself opened only when needed."""
    sas, backend = list_sas(args)
    if backend is not None:
        return Snapshot(backend, sas)
    return Snapshot(None, sas, lambda: open_backend(args), BUILTIN)  # (list_sas listed the built-in)


def run(args: Any) -> int:
    broker = _broker(args)
    if broker is not None:
        return run_via_broker(args, broker)
    sel, protocols, families = selection(args)
    with HoldersSoon() as holders_of:  # the /proc walk for PROCESS, on the other core meanwhile
        entries = list_sockets(args.netns, protocols=protocols, families=families, states=sel.states)
        if sel.predicate is not None:
            entries = [e for e in entries if sel.predicate(e)]
        if args.connected:
            entries = [e for e in entries if e.connected]
        snapshot = _snapshot(args)
        holders = holders_of.result()
    try:
        if args.json:
            emit_lines(list(map(_Lines(snapshot, holders), entries)))
        else:
            table(HEADERS, list(map(_Rows(snapshot, holders), entries)), cells_ready=True)
    finally:
        snapshot.close()
    return exits.OK
