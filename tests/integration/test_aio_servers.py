"""IPsecMiddleware and the aiohttp middleware in-process on the testbed: 1,000 concurrent requests
through the middleware on one loop (uvicorn, server in B, clients in A, all through the SA),
a server that hides its socket (the flow fallback), a proxy rewriting scope["client"], aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

pytest.importorskip("uvicorn")
aiohttp = pytest.importorskip("aiohttp")

import uvicorn  # noqa: E402
from aiohttp import web  # noqa: E402

from btns_lab.testbed import Testbed  # noqa: E402
from btns_vici import aio, netns  # noqa: E402
from btns_vici.asgi import IPsecMiddleware, btns_info  # noqa: E402

pytestmark = pytest.mark.testbed

N = 1000


@pytest.fixture
def sa(tb: Testbed) -> Testbed:
    tb.up("asgi-load", "rawkey", 4)
    return tb


def listener(tb: Testbed, addr: str, port: int) -> socket.socket:
    with tb.in_netns(tb.b):
        s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(4096)
    s.setblocking(False)
    return s


async def http_get(
    tb: Testbed, host: str, port: int, local: str, path: str = "/", headers: str = ""
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET from a fresh socket in A's namespace (made on the loop thread, briefly in A)."""
    loop = asyncio.get_running_loop()
    with netns.entered(tb.a.netns):
        s = socket.socket()
    s.setblocking(False)
    s.bind((local, 0))
    await loop.sock_connect(s, (host, port))
    reader, writer = await asyncio.open_connection(sock=s)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@contextlib.asynccontextmanager
async def uvicorn_on(app, sock: socket.socket, **kw):
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, backlog=4096, **kw)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def test_1000_concurrent_requests_through_the_middleware_on_one_loop(sa, backend_b):
    """All 1,000 requests are inside the app at the same moment, each with its verified pToken."""
    tb = sa
    inside = 0
    all_in = asyncio.Event()
    peers: list = []

    async def app(scope, receive, send):
        nonlocal inside
        info = btns_info(scope)
        peers.append(info)
        inside += 1
        if inside >= N:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 60)
        ok = info["ptoken"].protected and info["source"] == "socket"
        await send({"type": "http.response.start", "status": 200 if ok else 500, "headers": []})
        await send({"type": "http.response.body", "body": b"ok" if ok else info["reason"].encode()})

    async def main() -> tuple[list, float]:
        sock = listener(tb, str(tb.b.v4), 28200)
        async with uvicorn_on(IPsecMiddleware(app, backend_b), sock):
            t = time.perf_counter()
            sem = asyncio.Semaphore(N)  # all at once (no client-side limit below N)

            async def one():
                async with sem:
                    return await http_get(tb, str(tb.b.v4), 28200, str(tb.a.v4))

            results = await asyncio.gather(*(one() for _ in range(N)))
            return results, time.perf_counter() - t

    results, took = asyncio.run(asyncio.wait_for(main(), 120))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == N, {s: statuses.count(s) for s in set(statuses)}
    assert len(peers) == N and all(p["itoken"].pub_key_id == tb.a.key.public_der for p in peers)
    print(f"\n{N} concurrent requests through IPsecMiddleware (uvicorn, one loop): {took:.2f} s")


def test_clear_peer_and_rewritten_client_are_refused_socket_exact(sa, backend_b):
    """uvicorn trusting forwarded headers (forwarded_allow_ips='*') rewrites scope['client']: refused."""
    tb = sa
    seen: list = []

    async def app(scope, receive, send):
        seen.append(btns_info(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        sock = listener(tb, "0.0.0.0", 28201)
        async with uvicorn_on(IPsecMiddleware(app, backend_b), sock, proxy_headers=True, forwarded_allow_ips="*"):
            assert (await http_get(tb, str(tb.b.v4), 28201, str(tb.a.v4)))[0] == 204
            assert (await http_get(tb, str(tb.b.v4_plain), 28201, str(tb.a.v4_plain)))[0] == 204
            await http_get(tb, str(tb.b.v4), 28201, str(tb.a.v4), headers="X-Forwarded-For: 10.231.0.1\r\n")

    asyncio.run(asyncio.wait_for(main(), 60))
    through, clear, proxied = seen
    assert through["ptoken"].protected and through["source"] == "socket" and not through["proxied"]
    assert not clear["ptoken"].protected and clear["itoken"] is None and clear["source"] == "socket"
    assert proxied["proxied"] and proxied["source"] == "refused" and proxied["itoken"] is None
    assert not proxied["ptoken"].protected and "reverse proxy" in proxied["ptoken"].information_string
    assert proxied["hop_ptoken"].protected  # the hop itself was protected: still not the client's identity


def test_flow_fallback_when_the_server_hides_its_socket(sa, backend_b):
    """A send callable the middleware cannot see through: the flow of scope client/server is judged."""
    tb = sa
    seen: list = []

    class Opaque:  # hides the server's send behind an object with no known attribute
        def __init__(self, send):
            self._hidden = send

        async def __call__(self, message):
            await self._hidden(message)

    async def inner(scope, receive, send):
        seen.append(btns_info(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = IPsecMiddleware(inner, backend_b)

    async def hiding(scope, receive, send):
        await mw(scope, receive, Opaque(send))

    async def main() -> None:
        sock = listener(tb, "0.0.0.0", 28202)
        async with uvicorn_on(hiding, sock):
            await http_get(tb, str(tb.b.v4), 28202, str(tb.a.v4))
            await http_get(tb, str(tb.b.v4_plain), 28202, str(tb.a.v4_plain))

    asyncio.run(asyncio.wait_for(main(), 60))
    through, clear = seen
    assert through["source"] == "flow" and through["ptoken"].protected, through
    assert clear["source"] == "flow" and not clear["ptoken"].protected


def test_aiohttp_middleware_and_require_ipsec(sa, backend_b, tmp_path):
    from btns_vici.aiohttp_support import btns_info as btns_info_aiohttp
    from btns_vici.aiohttp_support import ipsec_middleware, require_ipsec
    from btns_vici.hostkey import load_or_create

    tb = sa
    stranger = load_or_create(tmp_path / "stranger")

    async def whoami(request: web.Request) -> web.Response:
        info = btns_info_aiohttp(request)
        return web.json_response(
            {
                "source": info["source"],
                "protected": info["ptoken"].protected,
                "cb": info["itoken"].channel_binding if info["itoken"] else None,
            }
        )

    pinned_ok = require_ipsec(peer=aio.pin_key(tb.a.key.public_pem))(whoami)
    pinned_wrong = require_ipsec(peer=aio.pin_key(stranger.public_pem))(whoami)

    async def main() -> list:
        app = web.Application(middlewares=[ipsec_middleware(backend_b)])
        app.router.add_get("/any", whoami)
        app.router.add_get("/ok", pinned_ok)
        app.router.add_get("/wrong", pinned_wrong)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.SockSite(runner, listener(tb, "0.0.0.0", 28203))
        await site.start()
        try:
            v4, plain, a4, ap = str(tb.b.v4), str(tb.b.v4_plain), str(tb.a.v4), str(tb.a.v4_plain)
            return [
                await http_get(tb, v4, 28203, a4, "/any"),
                await http_get(tb, plain, 28203, ap, "/any"),
                await http_get(tb, v4, 28203, a4, "/ok"),
                await http_get(tb, plain, 28203, ap, "/ok"),
                await http_get(tb, v4, 28203, a4, "/wrong"),
                await http_get(tb, v4, 28203, a4, "/ok", headers="Forwarded: for=192.0.2.1\r\n"),
            ]
        finally:
            await runner.cleanup()

    any_ok, any_clear, ok, ok_clear, wrong, proxied = asyncio.run(asyncio.wait_for(main(), 60))
    assert any_ok[0] == 200 and b'"protected": true' in any_ok[1] and b'"socket"' in any_ok[1]
    assert any_clear[0] == 200 and b'"protected": false' in any_clear[1]
    assert ok[0] == 200, ok
    assert ok_clear[0] == 403 and b"NOT protected" in ok_clear[1]
    assert wrong[0] == 403 and b"pubKeyID differs" in wrong[1], wrong
    assert proxied[0] == 403 and b"reverse proxy" in proxied[1], proxied
