"""The backend contract: one pluggy hook per operation. Each docstring is the contract.

A backend is a pluggy plugin registered under its name (``strongswan``,
``libreswan``, ...). The core calls a hook on exactly one backend at a time
(``PluginManager.subset_hook_caller``), so every operation hook is
``firstresult``. ``options`` is a read-only mapping of backend settings (for
example ``{"vici_socket": "/run/x.vici"}``); a backend caches its daemon
sessions per distinct options. A backend raises :class:`btns_vici.core.errors.BackendError`
(ECONNREFUSED) when its daemon does not answer and
:class:`btns_vici.core.errors.ProtocolError` (EPROTO) when the reply is malformed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .backend import BackendInfo, Capabilities, Enforcement, SAEvent
    from .core.records import ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
    from .core.selectors import Flow
    from .core.tokens import PToken

PROJECT = "btns_vici"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def btns_backend_info() -> BackendInfo:
    """Describe this backend: its name (as registered), its daemon and a one-line summary.

    Called on every plugin to list them; must not contact the daemon.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec(firstresult=True)
def btns_probe(options: Mapping[str, str]) -> bool | None:
    """True when this backend's daemon answers with the given options, False otherwise.

    Must not raise for a daemon that is simply down; used for default selection.
    """


@hookspec(firstresult=True)
def btns_capabilities(options: Mapping[str, str]) -> Capabilities | None:
    """What this backend can establish and enforce: auth methods, modes, data plane."""


@hookspec(firstresult=True)
def btns_list_sas(options: Mapping[str, str]) -> list[IkeSA] | None:
    """Every IKE_SA of the daemon with its CHILD_SAs, normalized, fresh from the daemon."""


@hookspec(firstresult=True)
def btns_find_sa(options: Mapping[str, str], flow: Flow) -> tuple[IkeSA, ChildSA] | None:
    """The established IKE_SA and installed CHILD_SA covering ``flow``, or None.

    Should answer from an index kept current by the daemon's events; must never
    answer from state older than the last event it processed (``btns_vici.backendkit.find_in``
    over fresh records is the simple way).
    """


@hookspec(firstresult=True)
def btns_verify_dataplane(
    options: Mapping[str, str], flow: Flow, ike_sa: IkeSA, child_sa: ChildSA, view: SocketView
) -> DataplaneProof | NotCarried | None:
    """Proof that the kernel carries the socket ``view``'s packets through ``child_sa``.

    Must judge the socket, not only its flow (``view.flow``, passed also as ``flow``):
    its device, mark, uid and, on kernel XFRM, its socket policies, and for
    ``view.direction == "in"`` where the datagram arrived (README "Socket-exact truth").
    ``btns_vici.dataplane.verify`` does this for both Linux data planes (a backend answers
    with ``btns_vici.backendkit.verify_dataplane``; docs/backends.md says what a proof must
    establish). Return
    NotCarried(reason) or None (fail closed) otherwise. The core has already checked
    that the socket lives in the namespace this backend speaks for (option ``netns``).
    """


@hookspec(firstresult=True)
def btns_enforce(options: Mapping[str, str], sock: Any, ptoken: PToken) -> Enforcement | None:
    """Make the daemon and the data plane demand ``ptoken``'s requirements for ``sock``.

    Raise NotSupportedError (EOPNOTSUPP) for a requirement the backend cannot meet.
    """


@hookspec(firstresult=True)
def btns_watch(options: Mapping[str, str], callback: Callable[[SAEvent], None]) -> Callable[[], None] | None:
    """Deliver SA events (up, down, rekey) to ``callback`` from a background thread.

    Returns a function that stops the watch. A ``reset`` event tells the caller to re-read
    everything (the daemon went away or restarted): ``btns_vici.backendkit.watch_thread``.
    """


@hookspec(firstresult=True)
def btns_establish(options: Mapping[str, str], flow: Flow, ptoken: PToken) -> str | None:
    """Bring up (as initiator) an SA covering ``flow`` that meets ``ptoken``; return its connection name.

    Called by ``btns_vici.connect`` before the socket connects; ``flow.local_port``
    and ``flow.remote_port`` may be 0 (not known yet). Raise NotSupportedError
    (EOPNOTSUPP) when the demand cannot be built, BtnsError(EHOSTUNREACH) when the
    peer does not agree.
    """


@hookspec(firstresult=True)
def btns_serve(options: Mapping[str, str], local_addr: Any, ptoken: PToken) -> str | None:
    """Accept (as responder) peers of ``local_addr`` that meet ``ptoken``; return the connection name."""


@hookspec(firstresult=True)
def btns_release(options: Mapping[str, str], name: str) -> bool | None:
    """Tear down and unload connection ``name`` that btns_establish/btns_serve loaded.

    Called when nothing uses it any more (the broker: the last client that had it loaded
    went away). Return True when done; None when the backend cannot (it stays loaded).
    """
