"""ASGI: the peer's verified IPsec identity in every request (``btns-vici[asgi]``).

``IPsecMiddleware(app)`` puts into ``scope["extensions"]["btns"]``, for ``http`` and
``websocket`` scopes::

    {"ptoken": PToken, "itoken": IToken | None, "source": "socket" | "flow" | "refused",
     "flow": Flow | None, "proxied": bool, "reason": str, "hop_ptoken": PToken | None}

``itoken`` is the peer's identity, present only when the pToken is protected. ASGI has no
standard key for the connection's socket, so the middleware looks for it where the server
keeps it: the object behind the ``send`` callable (uvicorn: the request cycle's or the
WebSocket protocol's ``transport``; hypercorn: stream -> protocol -> TCP server ->
``writer``), through bound methods, closures and ``transport``/``writer``/``send``
attributes. With the socket the answer is socket-exact (``source`` "socket"); without it
the flow of ``scope["client"]``/``scope["server"]`` is judged as an unbound, unmarked
socket of the backend's namespace (``source`` "flow", see README). Behind a reverse proxy
nothing is guessed: see :func:`btns_vici.aio.connection_info`.

Put the middleware outermost (``app = IPsecMiddleware(app)``); it needs no web framework.
:func:`require_ipsec` is a FastAPI/Starlette dependency answering 403 (WebSocket: close
1008 before accept) when the demand is not met; it imports Starlette lazily.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import aio
from .backend import Backend
from .core.constants import Setting
from .core.tokens import IToken, PToken

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXTENSION = "btns"
_WALK_ATTRS = ("transport", "_transport", "writer", "send", "_send", "app_send", "protocol")
_MAX_STEPS = 64


def find_socket(send: Any) -> Any:
    """The connected socket behind an ASGI ``send`` callable, or None (see the module docstring)."""
    frontier, seen, steps = [send], set(), 0
    while frontier and steps < _MAX_STEPS:
        obj = frontier.pop(0)
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, dict, list, tuple)):
            continue
        seen.add(id(obj))
        steps += 1
        if inspect.ismethod(obj):
            frontier.append(obj.__self__)
            continue
        if inspect.isfunction(obj):  # a wrapping middleware's closure over the next send
            frontier.extend(c.cell_contents for c in (obj.__closure__ or ()) if _filled(c))
            frontier.append(getattr(obj, "__wrapped__", None))
            continue
        get = getattr(obj, "get_extra_info", None)
        if callable(get) and not inspect.isclass(obj):
            try:
                sock = get("socket")
            except Exception:
                sock = None
            if sock is not None:
                return sock
        for name in _WALK_ATTRS:
            try:
                frontier.append(getattr(obj, name, None))
            except Exception:
                continue
    return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


class IPsecMiddleware:
    """ASGI middleware: ``scope["extensions"]["btns"]`` for every HTTP request and WebSocket.

    ``backend``: a Backend, a backend name, or None for the default. ``forwarded``: "refuse"
    (default) or "hop", see :func:`btns_vici.aio.connection_info`. ``require``: a demand
    (:func:`btns_vici.aio.demand`) the whole app enforces (403 / close 1008), else none.
    ``inline``: verify on the loop instead of the lookup pool (faster; a negative answer
    then costs a VICI round trip on the loop). HTTP verifies every request (the truth now,
    also on a kept-alive connection); a WebSocket once, at the handshake.
    """

    def __init__(
        self,
        app: ASGIApp,
        backend: Any = None,
        *,
        forwarded: str = "refuse",
        require: PToken | None = None,
        inline: bool = False,
    ) -> None:
        if forwarded not in ("refuse", "hop"):
            raise ValueError("forwarded must be 'refuse' or 'hop'")
        self.app = app
        self.backend = backend
        self.forwarded = forwarded
        self.require = require
        self.inline = inline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not isinstance(self.backend, Backend):  # resolved once (the default selection probes daemons)
            self.backend = await aio.resolve_backend(self.backend)
        info = await aio.connection_info(
            sock=find_socket(send),
            client=scope.get("client"),
            server=scope.get("server"),
            headers=scope.get("headers") or (),
            backend=self.backend,
            forwarded=self.forwarded,
            inline=self.inline,
        )
        scope = dict(scope)
        scope["extensions"] = {**(scope.get("extensions") or {}), EXTENSION: info}
        if self.require is not None:
            problems = aio.check(info, self.require)
            if problems:
                await deny(scope, receive, send, problems)
                return
        await self.app(scope, receive, send)


async def deny(scope: Scope, receive: Receive, send: Send, problems: list[str]) -> None:
    """Answer 403 (HTTP) or close 1008 before accepting (WebSocket: the server answers 403)."""
    if scope.get("type") == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": "IPsec requirement not met"[:120]})
        return
    body = json.dumps({"detail": "IPsec requirement not met", "problems": problems}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def btns_info(scope_or_request: Any) -> dict[str, Any] | None:
    """``scope["extensions"]["btns"]`` of a scope, a Starlette Request/WebSocket, or None."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return (scope.get("extensions") or {}).get(EXTENSION)


def require_ipsec(
    peer: IToken | PToken | None = None, min_privacy: Setting = Setting.ENABLE, min_integrity: Setting = Setting.ENABLE
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """A FastAPI/Starlette dependency: the request's btns info when the peer meets the demand,
    else HTTPException 403 (WebSocket: WebSocketException 1008, the server answers 403).

    ``peer``: an iToken the peer must match (:func:`btns_vici.aio.pin_key`, or one saved with
    ``IToken.to_bytes``), or a whole demand PToken. Without IPsecMiddleware: 500.
    Use ``Depends(require_ipsec(...))`` on a route, a router or ``FastAPI(dependencies=[...])``.
    """
    from starlette.exceptions import HTTPException, WebSocketException
    from starlette.requests import HTTPConnection

    want = aio.demand(peer, min_privacy, min_integrity)

    async def ipsec_peer(conn: HTTPConnection) -> dict[str, Any]:
        info = btns_info(conn)
        if info is None:
            raise HTTPException(500, "IPsecMiddleware is not installed: no IPsec verdict for this request")
        problems = aio.check(info, want)
        if problems:
            if conn.scope.get("type") == "websocket":
                raise WebSocketException(1008, "IPsec requirement not met")
            raise HTTPException(403, "IPsec requirement not met: " + "; ".join(problems))
        return info

    ipsec_peer.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("conn", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection)],
        return_annotation=dict,
    )
    return ipsec_peer


__all__ = ["EXTENSION", "IPsecMiddleware", "btns_info", "deny", "find_socket", "require_ipsec"]
