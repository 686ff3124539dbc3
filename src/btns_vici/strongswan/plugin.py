"""The built-in strongSwan backend: pluggy hooks of :mod:`btns_vici.hookspecs` over charon's VICI.

Options (all optional):

* ``vici_socket``: path of charon's VICI socket (default ``/var/run/charon.vici``);
* ``netns``: network namespace (name under /run/netns or a path) whose routing the
  data-plane proof inspects, i.e. where the sockets and charon live (default: ours);
* ``index``: ``events`` (default, the event-fed :class:`~.index.SAIndex`) or ``list``
  (re-list every SA per query; slower, for comparison);
* ``consistency``: ``strict`` confirms every answer with a VICI round trip on the event
  connection (+~80 us); by default only negative answers are (see :meth:`.index.SAIndex.find`);
* ``timeout`` (else ``$BTNS_VICI_TIMEOUT``, default 5): deadline in seconds of every VICI
  command as a whole (connect, send, every byte of the reply);
* ``list_timeout``: deadline of a streamed listing (default 6 x ``timeout``);
* ``probe_timeout``: deadline of the probe (default selection), default min(1, ``timeout``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .. import forksafe
from ..backend import BackendInfo, Capabilities, SAEvent
from ..backendkit import find_in, verify_dataplane, watch_thread
from ..core.constants import AuthMethod
from ..core.errors import DaemonDownError, ProtocolError
from ..core.records import LIBIPSEC, XFRM, ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from ..core.selectors import Flow
from ..hookspecs import hookimpl
from . import parse
from .enforce import EnforceHooks
from .events import EventStream
from .index import SAIndex
from .listing import list_records, socket_path
from .session import ViciSession, timeouts

NAME = "strongswan"


class Context:
    """Sessions and index for one set of options (one charon)."""

    def __init__(self, options: Mapping[str, str]) -> None:
        self.path = socket_path(options)
        self.netns = options.get("netns") or None
        self.mode = options.get("index", "events")
        self.timeout, self.list_timeout, self.probe_timeout = timeouts(options)
        self.session = ViciSession(self.path, self.timeout, self.list_timeout)
        self.index = SAIndex(
            self.path,
            ViciSession(self.path, self.timeout, self.list_timeout),
            strict=options.get("consistency") == "strict",
            timeout=self.timeout,
            background=True,  # configurations fetched after the first answer, off its path
        )
        self._dataplane: str | None = None
        self._lock = threading.Lock()

    def dataplane(self) -> str:
        """kernel-libipsec when charon loaded that plugin, else kernel-xfrm (cached per index resync)."""
        if self._dataplane is None:
            plugins = [parse.text(p) for p in self.session.stats().get("plugins", [])]
            self._dataplane = LIBIPSEC if "kernel-libipsec" in plugins else XFRM
        return self._dataplane

    def list_sas(self) -> list[IkeSA]:
        """Fresh from charon: list-sas, list-conns, list-certs -> records (no index)."""
        return list_records(self.session)

    def close(self) -> None:
        self.index.close()
        self.session.close()


class StrongswanPlugin(EnforceHooks):
    """The hook implementations; one :class:`Context` per distinct options mapping."""

    def __init__(self) -> None:
        self._contexts: dict[frozenset[tuple[str, str]], Context] = {}
        self._last: tuple[Mapping[str, str], Context] | None = None
        self._lock = threading.Lock()

    def context(self, options: Mapping[str, str]) -> Context:
        """The Context of ``options`` (fast path: the same mapping object as last time)."""
        last = self._last
        if last is not None and last[0] is options and isinstance(options, MappingProxyType):
            return last[1]
        key = frozenset(options.items())
        ctx = self._contexts.get(key)
        if ctx is None:
            with self._lock:
                ctx = self._contexts.get(key)
                if ctx is None:
                    ctx = self._contexts[key] = Context(options)
        self._last = (options, ctx)
        return ctx

    def forget(self, options: Mapping[str, str]) -> None:
        """Close and drop the sessions of ``options`` (e.g. when a testbed goes away)."""
        with self._lock:
            ctx = self._contexts.pop(frozenset(options.items()), None)
            self._last = None
        if ctx is not None:
            ctx.close()

    @hookimpl
    def btns_backend_info(self) -> BackendInfo:
        return BackendInfo(NAME, "strongSwan charon (VICI)", "IKEv2 SAs from charon over VICI, event-fed index")

    @hookimpl
    def btns_probe(self, options: Mapping[str, str]) -> bool:
        """True when charon answers ``version`` within ``probe_timeout``; False when no charon is
        there (DaemonDownError). A charon that is there but unusable raises: EACCES, ETIMEDOUT, EPROTO."""
        ctx = self.context(options)
        try:
            ctx.session.request("version", timeout=ctx.probe_timeout)
        except DaemonDownError:
            return False
        return True

    @hookimpl
    def btns_capabilities(self, options: Mapping[str, str]) -> Capabilities:
        kind = self.context(options).dataplane()
        modes = frozenset({"TUNNEL"}) if kind == LIBIPSEC else frozenset({"TUNNEL", "TRANSPORT"})
        methods = frozenset(
            {AuthMethod.BTNS, AuthMethod.PRESHAREDKEY, AuthMethod.PKIX_TRUSTED, AuthMethod.EAP, AuthMethod.XAUTH}
        )
        return Capabilities(auth_methods=methods, modes=modes, dataplane=kind, enforce=True)

    @hookimpl
    def btns_list_sas(self, options: Mapping[str, str]) -> list[IkeSA]:
        return self.context(options).list_sas()

    @hookimpl
    def btns_find_sa(self, options: Mapping[str, str], flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        ctx = self.context(options)
        if ctx.mode == "list":
            return find_in(ctx.list_sas(), flow)
        return ctx.index.find(flow)

    @hookimpl
    def btns_verify_dataplane(
        self, options: Mapping[str, str], flow: Flow, ike_sa: IkeSA, child_sa: ChildSA, view: SocketView
    ) -> DataplaneProof | NotCarried | None:
        ctx = self.context(options)
        return verify_dataplane(NAME, view, ike_sa, child_sa, ctx.dataplane(), ctx.netns)

    @hookimpl
    def btns_watch(self, options: Mapping[str, str], callback: Callable[[SAEvent], None]) -> Callable[[], None]:
        ctx = self.context(options)
        return watch(ctx.path, callback, ctx.timeout)


def to_sa_event(name: str, msg: Mapping[str, Any]) -> SAEvent:
    """A VICI SA event -> SAEvent (kinds as in :class:`btns_vici.backend.SAEvent`); EPROTO if malformed."""
    try:
        return _to_sa_event(name, msg)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"malformed VICI {name} event: {type(exc).__name__}: {exc}") from None


def _to_sa_event(name: str, msg: Mapping[str, Any]) -> SAEvent:
    up = msg.get("up") == b"yes"
    ike_name, sec = parse.single_section(msg, name)
    kind = {"ike-updown": "ike-", "child-updown": "child-"}.get(name)
    kind = kind + ("up" if up else "down") if kind else name
    child_name = child_uid = ""
    kids = sec.get("child-sas") or {}
    for entry in kids.values():
        entry = entry.get("new", entry)
        child_name = parse.text(entry.get("name", b""))
        child_uid = parse.text(entry.get("uniqueid", b""))
    ike_sec = sec.get("new", sec)
    return SAEvent(kind, ike_name, child_name, parse.text(ike_sec.get("uniqueid", b"")), child_uid, msg)


def watch(path: str, callback: Callable[[SAEvent], None], timeout: float | None = None) -> Callable[[], None]:
    """Deliver SA events from a background thread; a ``reset`` event when charon goes away."""
    stream = EventStream(path) if timeout is None else EventStream(path, timeout=timeout)

    def poll() -> list[SAEvent]:
        return [to_sa_event(name, msg) for name, msg in stream.poll(0.2)]

    return watch_thread("btns-strongswan-watch", poll, callback, close=stream.close)


plugin = StrongswanPlugin()


@forksafe.in_child
def _reset_after_fork() -> None:
    """A forked child gets its own sessions and index (the parent's event thread is not in the child)."""
    contexts = list(plugin._contexts.values())
    plugin._contexts.clear()
    plugin._last = None
    plugin._lock = threading.Lock()
    for ctx in contexts:
        ctx.session._drop()  # the child's copy of the command connection; the index's stays unused
