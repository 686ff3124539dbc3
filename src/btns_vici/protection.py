"""The verified pToken of a socket: the one place every path that reports protection asks.

``get_socket_ptoken``, the ``ipsec_get_*`` functions, the check after connect/accept,
latching, the datagram path, the C ABI and the ``btns`` commands all come here, so
every "protected" answer is made the same way (README "Socket-exact truth"): the
socket as the kernel will treat it (:class:`~btns_vici.core.records.SocketView`) -> the
backend's CHILD_SA and data-plane proof -> the pToken. A demand is held against that
pToken here too (:func:`require`): what it does not meet is a
:class:`~btns_vici.core.errors.RequirementNotMetError` (EACCES) with the list of problems.
"""

from __future__ import annotations

from collections.abc import Callable

from .backend import Backend
from .core.derive import ptoken_for, unprotected_ptoken
from .core.errors import RequirementNotMetError
from .core.records import NotCarried, Protection, SocketView
from .core.requirements import unmet
from .core.selectors import Flow
from .core.tokens import PToken

#: How a connection that does not meet its socket's pToken is refused (connect, accept, btnsd).
CONNECTION_REFUSAL = "protection does not meet the socket's pToken"
#: How a datagram that does not meet its message's pToken is refused (sendmsg, the C ABI, btnsd).
DATAGRAM_REFUSAL = "datagram refused, pToken not met"


def verify(view: SocketView, backend: Backend) -> tuple[Protection | None, PToken]:
    """The verified protection of the socket ``view`` (None: not protected) and its pToken."""
    verdict = backend.protect(view)
    if isinstance(verdict, NotCarried):
        return None, unprotected_ptoken(view.flow, f"{verdict.reason} [socket {view.facts()}]")
    return verdict, ptoken_for(verdict)


def flow_view(flow: Flow, backend: Backend) -> SocketView:
    """A bare flow as an unbound, unmarked socket of the backend's namespace."""
    return SocketView(flow=flow, netns=backend.netns_id)


def verify_flow(flow: Flow, backend: Backend) -> tuple[Protection | None, PToken]:
    """:func:`verify` for a bare flow (see :func:`flow_view`)."""
    return verify(flow_view(flow, backend), backend)


def ptoken_of(view: SocketView, backend: Backend) -> PToken:
    """The pToken of the socket ``view``: protected only when verified for this very socket."""
    return with_use_reason(view, verify(view, backend)[1])


#: Who can say why a clear socket talks in clear (acquire: a "btns:use" attempt that failed).
#: Registered by those modules when they are imported: a process that never armed such a socket
#: has none, and this module imports none of them.
_CLEAR_REASONS: list[Callable[[SocketView], str | None]] = []


def explains_clear(fn: Callable[[SocketView], str | None]) -> Callable[[SocketView], str | None]:
    """Register ``fn(view)``: why the clear socket ``view`` talks in clear, or None (decorator)."""
    _CLEAR_REASONS.append(fn)
    return fn


def with_use_reason(view: SocketView, tok: PToken) -> PToken:
    """``tok``, or for a clear socket whose clear talk has a known reason (a ``btns:use`` socket
    whose negotiation failed: README "Demand settings"), a clear pToken that also says why."""
    if tok.protected or not _CLEAR_REASONS:
        return tok
    for explain in _CLEAR_REASONS:
        why = explain(view)
        if why:
            reason = (tok.information_string or "").partition("NOT protected by IPsec: ")[2]
            return unprotected_ptoken(view.flow, f"{why}; {reason}" if reason else why)
    return tok


def ptoken_of_flow(flow: Flow, backend: Backend) -> PToken:
    """The pToken of a bare flow, judged as an unbound, unmarked socket of the backend's namespace."""
    return ptoken_of(flow_view(flow, backend), backend)


def shortfall(demand: PToken, view: SocketView, backend: Backend) -> tuple[PToken, list[str]]:
    """The actual pToken of ``view`` and what of ``demand`` it does not meet (empty: met)."""
    actual = ptoken_of(view, backend)
    problems = unmet(demand, actual)
    if problems and not actual.protected:
        problems.append(f"why: {actual.information_string}")
    return actual, problems


def require(demand: PToken, view: SocketView, backend: Backend, refusal: str = CONNECTION_REFUSAL) -> PToken:
    """The actual pToken of ``view`` when it meets ``demand``; else RequirementNotMetError (EACCES)."""
    actual, problems = shortfall(demand, view, backend)
    if problems:
        raise RequirementNotMetError(refusal, problems)
    return actual
