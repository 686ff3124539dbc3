"""The verified pToken of a socket: the one place every path that reports protection asks.

``get_socket_ptoken``, the ``ipsec_get_*`` functions, the check after connect/accept,
latching, the datagram path, the C ABI and the ``btns`` commands all come here, so
every "protected" answer is made the same way (README "Socket-exact truth"): the
socket as the kernel will treat it (:class:`~btns_vici.core.records.SocketView`) -> the
backend's CHILD_SA and data-plane proof -> the pToken.
"""

from __future__ import annotations

from .backend import Backend
from .core.derive import ptoken_for, unprotected_ptoken
from .core.records import NotCarried, Protection, SocketView
from .core.requirements import unmet
from .core.selectors import Flow
from .core.tokens import PToken


def protection_of(view: SocketView, backend: Backend) -> Protection | NotCarried:
    """The verified protection of the socket ``view`` (see :meth:`Backend.protect`)."""
    return backend.protect(view)


def ptoken_of(view: SocketView, backend: Backend) -> PToken:
    """The pToken of the socket ``view``: protected only when verified for this very socket."""
    verdict = backend.protect(view)
    if isinstance(verdict, NotCarried):
        return unprotected_ptoken(view.flow, f"{verdict.reason} [socket {view.facts()}]")
    return ptoken_for(verdict)


def ptoken_of_flow(flow: Flow, backend: Backend) -> PToken:
    """The pToken of a bare flow, judged as an unbound, unmarked socket of the backend's namespace."""
    return ptoken_of(SocketView(flow=flow, netns=backend.netns_id), backend)


def shortfall(demand: PToken, view: SocketView, backend: Backend) -> tuple[PToken, list[str]]:
    """The actual pToken of ``view`` and what of ``demand`` it does not meet (empty: met)."""
    actual = ptoken_of(view, backend)
    problems = unmet(demand, actual)
    if problems and not actual.protected:
        problems.append(f"why: {actual.information_string}")
    return actual, problems
