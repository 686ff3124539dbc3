"""asyncio costs on the host testbed (root needed): aio.get_socket_ptoken queries/s from one loop,
and IPsecMiddleware's overhead per request against the same app without it. Rates are the best
of 3 runs (the machine is shared).

    .venv/bin/python benchmarks/bench_aio.py [--queries 5000] [--requests 3000] [--conns 50]

One raw-key CHILD_SA protects A <-> B. Measured on one event loop:

* ``get_socket_ptoken``: ``aio.get_socket_ptoken`` on one protected TCP socket, awaited one at
  a time (``serial``), 100 at a time (``gather``), with ``inline=True`` (on the loop), and the
  blocking ``api.get_socket_ptoken`` called from the loop for comparison;
* ``middleware direct``: the ASGI call alone (no HTTP), a trivial app with and without
  IPsecMiddleware, ``send`` bound to an object whose transport holds that protected socket
  (what the middleware finds under uvicorn);
* ``uvicorn``: real HTTP/1.1 keep-alive requests from ``--conns`` connections in A through the
  SA to uvicorn in B (server and clients share the loop), with and without the middleware.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import uvicorn

from btns_lab.testbed import Testbed, connected_pair
from btns_vici import aio, api, netns
from btns_vici.asgi import IPsecMiddleware, btns_info
from btns_vici.plugins import get_backend, get_plugin_manager

BEST_OF = 3  # the machine is shared: each rate is the best of 3 runs


async def rate(fn, n: int) -> float:
    best = 0.0
    for _ in range(BEST_OF):
        t = time.perf_counter()
        for _ in range(n):
            await fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


async def gather_rate(fn, n: int, width: int = 100) -> float:
    best = 0.0
    for _ in range(BEST_OF):
        t = time.perf_counter()
        for _ in range(n // width):
            await asyncio.gather(*(fn() for _ in range(width)))
        best = max(best, (n // width) * width / (time.perf_counter() - t))
    return best


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    info = btns_info(scope)
    body = b"ok" if info is None or info["ptoken"].protected else b"clear"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Transport:
    def __init__(self, sock):
        self.sock = sock

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default


class Cycle:
    def __init__(self, sock):
        self.transport = Transport(sock)

    async def send(self, message):
        pass


async def direct(asgi, sock, n: int, peer: tuple, local: tuple) -> float:
    """Microseconds per ASGI call of ``asgi`` (the best of 5 runs)."""
    cycle = Cycle(sock)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": peer, "server": local}

    async def receive():
        return {"type": "http.request", "body": b""}

    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            await asgi(scope, receive, cycle.send)
        runs.append((time.perf_counter() - t) / n * 1e6)
    return min(runs)


async def http_load(tb: Testbed, port: int, conns: int, requests: int) -> float:
    """Requests per second over ``conns`` keep-alive connections from A."""
    loop = asyncio.get_running_loop()
    per = requests // conns
    req = f"GET / HTTP/1.1\r\nHost: {tb.b.v4}\r\n\r\n".encode()

    async def client() -> None:
        with netns.entered(tb.a.netns):
            s = socket.socket()
        s.setblocking(False)
        s.bind((str(tb.a.v4), 0))
        await loop.sock_connect(s, (str(tb.b.v4), port))
        reader, writer = await asyncio.open_connection(sock=s)
        for _ in range(per):
            writer.write(req)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conns)))
    return per * conns / (time.perf_counter() - t)


async def served(tb: Testbed, asgi, port: int, conns: int, requests: int) -> float:
    with netns.entered(tb.b.netns):
        ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((str(tb.b.v4), port))
    ls.listen(1024)
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[ls]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await http_load(tb, port, conns, max(conns, requests // 10))  # warm up
        return max([await http_load(tb, port, conns, requests) for _ in range(BEST_OF)])
    finally:
        server.should_exit = True
        await task
        ls.close()


async def main_async(tb: Testbed, args: argparse.Namespace) -> None:
    be_a = get_backend("strongswan", tb.a.options)
    be_b = get_backend("strongswan", tb.b.options)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4)
    assert api.get_socket_ptoken(cli, be_a).protected
    n = args.queries

    async def pooled():
        return await aio.get_socket_ptoken(cli, be_a)

    async def inline():
        return await aio.get_socket_ptoken(cli, be_a, inline=True)

    async def blocking():
        return api.get_socket_ptoken(cli, be_a)

    await rate(pooled, 200)
    rows = [
        ("aio.get_socket_ptoken, serial (lookup pool)", await rate(pooled, n)),
        ("aio.get_socket_ptoken, 100 in flight (lookup pool)", await gather_rate(pooled, n)),
        ("aio.get_socket_ptoken(inline=True), serial", await rate(inline, n)),
        ("api.get_socket_ptoken called on the loop (blocking)", await rate(blocking, n)),
    ]
    print("\nqueries/s of one protected socket's pToken from one loop")
    for name, qps in rows:
        print(f"  {name:<55} {qps:>10,.0f} /s   {1e6 / qps:>7.1f} us")

    peer, local = srv.getpeername(), srv.getsockname()
    bare = await direct(app, srv, 2000, peer, local)
    mw = await direct(IPsecMiddleware(app, be_b), srv, 2000, peer, local)
    mw_inline = await direct(IPsecMiddleware(app, be_b, inline=True), srv, 2000, peer, local)
    print("\nASGI call alone (no HTTP), microseconds per request (best of 5 x 2,000)")
    print(f"  {'app':<55} {bare:>10.1f}")
    print(f"  {'IPsecMiddleware(app)':<55} {mw:>10.1f}   (+{mw - bare:.1f})")
    print(f"  {'IPsecMiddleware(app, inline=True)':<55} {mw_inline:>10.1f}   (+{mw_inline - bare:.1f})")

    base = await served(tb, app, 28300, args.conns, args.requests)
    with_mw = await served(tb, IPsecMiddleware(app, be_b), 28301, args.conns, args.requests)
    with_inline = await served(tb, IPsecMiddleware(app, be_b, inline=True), 28302, args.conns, args.requests)
    print(f"\nuvicorn over the SA, {args.conns} keep-alive connections, {args.requests:,} requests (one loop)")
    for name, rps in (
        ("app", base),
        ("IPsecMiddleware(app)", with_mw),
        ("IPsecMiddleware(app, inline=True)", with_inline),
    ):
        extra = "" if rps == base else f"   (+{1e6 / rps - 1e6 / base:.0f} us/request)"
        print(f"  {name:<55} {rps:>10,.0f} req/s {1e6 / rps:>7.0f} us{extra}")
    cli.close()
    srv.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--conns", type=int, default=50)
    args = ap.parse_args()
    with Testbed() as tb:
        tb.up("bench-aio", "rawkey", 4)
        try:
            asyncio.run(main_async(tb, args))
        finally:
            plugin = get_plugin_manager().get_plugin("strongswan")
            for p in tb.peers:
                plugin.forget(p.options)


if __name__ == "__main__":
    main()
