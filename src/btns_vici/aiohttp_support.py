"""aiohttp: the peer's verified IPsec identity in every request (``btns-vici[aiohttp]``).

The same contract as :mod:`btns_vici.asgi`: ``btns_info(request)`` (``request[KEY]``) is the dict of
:func:`btns_vici.aio.connection_info` (``ptoken``, ``itoken``, ``source``, ``proxied``, ...),
made from the request's own connected socket (``request.transport.get_extra_info("socket")``,
so always ``source`` "socket"). Behind a reverse proxy (a forwarding header, or
``request.remote`` rewritten, e.g. by aiohttp-remotes) nothing is guessed.

    app = web.Application(middlewares=[ipsec_middleware()])

    @require_ipsec(peer=pin_key(client_pem))
    async def handler(request):
        return web.json_response({"peer": btns_info(request)["itoken"].channel_binding})

(Named ``aiohttp_support`` so that it never shadows the ``aiohttp`` package.)
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import aio
from .authority import Authority
from .core.constants import Setting
from .core.tokens import IToken, PToken

#: Where the info lives: ``request[KEY]`` (a ``web.RequestKey`` where aiohttp has them, else "btns").
KEY: Any = web.RequestKey("btns", dict) if hasattr(web, "RequestKey") else "btns"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def request_info(
    request: web.Request, backend: Any = None, *, forwarded: str = "refuse", inline: bool = False
) -> dict[str, Any]:
    """:func:`btns_vici.aio.connection_info` for an aiohttp request."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    peer = transport.get_extra_info("peername") if transport is not None else None
    server = transport.get_extra_info("sockname") if transport is not None else None
    client = None
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        client = (request.remote or peer[0], peer[1])  # request.remote differs once a proxy helper rewrote it
    headers = [(k.lower(), v) for k, v in request.raw_headers]
    return await aio.connection_info(
        sock=sock, client=client, server=server, headers=headers, backend=backend, forwarded=forwarded, inline=inline
    )


def ipsec_middleware(
    backend: Any = None, *, forwarded: str = "refuse", require: PToken | None = None, inline: bool = False
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware setting ``request[KEY]`` (see :func:`btns_info`); with ``require`` (a demand, see
    :func:`btns_vici.aio.demand`) every request not meeting it gets 403."""
    if forwarded not in ("refuse", "hop"):
        raise ValueError("forwarded must be 'refuse' or 'hop'")

    resolved: list[Authority] = []

    @web.middleware
    async def btns_ipsec(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not resolved:  # once: the default selection probes daemons
            resolved.append(await aio.resolve_backend(backend))
        info = await request_info(request, resolved[0], forwarded=forwarded, inline=inline)
        request[KEY] = info
        if require is not None:
            _enforce(info, require)
        return await handler(request)

    return btns_ipsec


def btns_info(request: web.Request) -> dict[str, Any] | None:
    return request.get(KEY)


def _enforce(info: dict[str, Any] | None, want: PToken) -> dict[str, Any]:
    problems = aio.check(info, want)
    if problems:
        raise web.HTTPForbidden(text="IPsec requirement not met: " + "; ".join(problems))
    assert info is not None
    return info


def check_ipsec(
    request: web.Request,
    peer: IToken | PToken | None = None,
    min_privacy: Setting = Setting.ENABLE,
    min_integrity: Setting = Setting.ENABLE,
) -> dict[str, Any]:
    """The request's btns info if the peer meets the demand, else HTTPForbidden (403).
    Without :func:`ipsec_middleware`: HTTPInternalServerError."""
    info = btns_info(request)
    if info is None:
        raise web.HTTPInternalServerError(text="ipsec_middleware is not installed: no IPsec verdict")
    return _enforce(info, aio.demand(peer, min_privacy, min_integrity))


def require_ipsec(
    peer: IToken | PToken | None = None, min_privacy: Setting = Setting.ENABLE, min_integrity: Setting = Setting.ENABLE
) -> Callable[[Handler], Handler]:
    """A handler decorator: :func:`check_ipsec` before the handler runs (403 when unmet)."""
    want = aio.demand(peer, min_privacy, min_integrity)

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            info = btns_info(request)
            if info is None:
                raise web.HTTPInternalServerError(text="ipsec_middleware is not installed: no IPsec verdict")
            _enforce(info, want)
            return await handler(request)

        return wrapped

    return decorate


__all__ = ["KEY", "btns_info", "check_ipsec", "ipsec_middleware", "request_info", "require_ipsec"]
