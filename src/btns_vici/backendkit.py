"""The backend kit: what every IKE backend needs besides its own parsing (docs/backends.md).

The strongSwan and libreswan backends share these, so a third backend is mostly the code
that turns its daemon's answers into :mod:`btns_vici.core.records`:

* :func:`find_in`: the established IKE_SA and installed CHILD_SA covering a flow, from records;
* :func:`demand_digest` / :func:`demand_name` / :func:`demand_number`: stable names (and
  numbers, e.g. a reqid) for connections built from a demand, so the same demand reuses its
  connection; :data:`CONN_PREFIX` marks every connection the library loaded;
* :data:`RAW_KEY_METHODS` and :func:`allows_raw_keys`: the methods a library-built raw-key
  connection can satisfy;
* :data:`Proposal` and :func:`esp_proposals`: a backend's ESP proposal table (in its own
  syntax) filtered by the demanded levels;
* :func:`watch_thread`: SA events from a background thread, a ``reset`` when the daemon goes;
* :func:`verify_dataplane`: the ``btns_verify_dataplane`` answer for a backend's own records.

The unmet-demand error is :class:`btns_vici.core.errors.RequirementNotMetError` (EACCES);
a requirement a backend cannot build is :class:`~btns_vici.core.errors.NotSupportedError`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable

from .backend import SAEvent
from .core.constants import AuthMethod, Setting
from .core.records import ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from .core.requirements import allowed_methods, choose_proposals
from .core.selectors import Flow
from .core.tokens import PToken
from .dataplane import verify

#: The name prefix of every connection the library loads into a daemon (and only those).
CONN_PREFIX = "btns-"
#: Methods a library-built raw-key connection satisfies: BTNS (unauthenticated) and leap of faith.
RAW_KEY_METHODS = frozenset({AuthMethod.BTNS, AuthMethod.LEAPOFFAITH})

#: One ESP proposal in the backend's own syntax with its (privacy, integrity) levels.
Proposal = tuple[str, Setting, Setting]


def find_in(sas: Iterable[IkeSA], flow: Flow) -> tuple[IkeSA, ChildSA] | None:
    """The first established IKE_SA with an installed CHILD_SA covering ``flow`` (``IkeSA.child_for``)."""
    for ike in sas:
        child = ike.child_for(flow)
        if child is not None:
            return ike, child
    return None


def demand_digest(*parts: str | bytes) -> bytes:
    """SHA-256 over ``parts`` (text as UTF-8), each followed by a NUL: equal parts, equal digest."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.digest()


def demand_name(role: str, *parts: str | bytes) -> str:
    """``btns-<role>-<12 hex digits>``: a stable connection name for (role, ``parts``)."""
    return f"{CONN_PREFIX}{role}-{demand_digest(role, *parts).hex()[:12]}"


def demand_number(modulus: int, *parts: str | bytes) -> int:
    """A stable number in 1..``modulus`` for ``parts`` (e.g. a reqid fixed per demand)."""
    return 1 + int.from_bytes(demand_digest(*parts)[:4], "big") % modulus


def allows_raw_keys(demand: PToken) -> bool:
    """True when the demand allows a method a raw-key connection satisfies (BTNS, LEAPOFFAITH)."""
    return bool(allowed_methods(demand) & RAW_KEY_METHODS)


def esp_proposals(demand: PToken, table: Iterable[Proposal]) -> list[str]:
    """The proposals of ``table`` meeting the demanded privacy and integrity levels, in table order.

    Raises NotSupportedError (EOPNOTSUPP) when none does; integrity-only proposals
    (privacy DISABLE) only when privacy DISABLE is demanded.
    """
    return choose_proposals(demand, table)


def verify_dataplane(
    backend: str, view: SocketView, ike: IkeSA, child: ChildSA, dataplane: str, netns_name: str | None
) -> DataplaneProof | NotCarried | None:
    """The data-plane proof for a backend's own records (None for another backend's: not ours to judge)."""
    if ike.backend != backend:
        return None
    return verify(view, ike, child, dataplane, netns_name)


def watch_thread(
    name: str,
    poll: Callable[[], Iterable[SAEvent]],
    callback: Callable[[SAEvent], None],
    *,
    interval: float = 0.0,
    resume: bool = False,
    close: Callable[[], None] | None = None,
    join_timeout: float = 2.0,
) -> Callable[[], None]:
    """Deliver the events of ``poll()`` to ``callback`` from a daemon thread; returns the stopper.

    ``poll`` is one round (it may wait a little itself); ``interval`` seconds pass between
    rounds. When ``poll`` raises OSError (every BackendError: the daemon went away or answered
    nonsense), ``callback`` gets one ``SAEvent("reset")`` (the caller re-reads everything);
    then the watch ends (an event stream that broke), or with ``resume`` polls again (a
    daemon polled for its state). ``close`` runs when the thread ends. The stopper waits
    at most ``join_timeout`` seconds for the thread.
    """
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.wait(interval):
                try:
                    events = list(poll())
                except OSError:
                    if not stop.is_set():
                        callback(SAEvent("reset"))
                    if resume:
                        continue
                    return
                for event in events:
                    callback(event)
        finally:
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join(join_timeout)

    return stopper
