"""btns_vici.asgi / aio web edge without a testbed: finding the server's socket, refusing
proxied requests, require_ipsec answers, the executor after fork, the core imports no framework."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from btns_vici import AuthMethod, Setting, aio
from btns_vici.core.constants import Attr
from btns_vici.core.derive import restored_ptoken, unprotected_ptoken
from btns_vici.core.tokens import IToken, PToken

KEY = b"0*0\x05\x06\x03+ep\x03!\x00" + bytes(range(32))  # an ed25519 SPKI


@pytest.fixture
def no_daemon(monkeypatch):
    """The middleware resolves its backend first: give it a stand-in (the tests stub the queries)."""

    async def fake_backend(backend=None):
        return backend

    monkeypatch.setattr(aio, "resolve_backend", fake_backend)


def protected_token(key: bytes = KEY) -> PToken:
    return restored_ptoken(
        {
            Attr.privacyProtected: int(Setting.LEVEL_HIGH),
            Attr.integrityProtected: int(Setting.LEVEL_HIGH),
            Attr.informationString: "test: protected",
            Attr.iToken: IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=key),
        }
    )


class FakeTransport:
    def __init__(self, sock):
        self.sock = sock

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default


class UvicornCycle:  # uvicorn: RequestResponseCycle.send, .transport
    def __init__(self, sock):
        self.transport = FakeTransport(sock)

    async def send(self, message):
        pass


class HypercornTCPServer:  # hypercorn: TCPServer.protocol_send, .writer
    def __init__(self, sock):
        self.writer = FakeTransport(sock)

    async def protocol_send(self, event):
        pass


class HypercornProtocol:
    def __init__(self, server):
        self.send = server.protocol_send

    async def stream_send(self, event):
        pass


class HypercornStream:
    def __init__(self, proto):
        self.send = proto.stream_send

    async def app_send(self, message):
        pass


def test_find_socket_in_uvicorn_and_hypercorn_shapes_and_through_closures():
    from btns_vici.asgi import find_socket

    marker = type("Sock", (), {})()
    assert find_socket(UvicornCycle(marker).send) is marker
    chain = HypercornStream(HypercornProtocol(HypercornTCPServer(marker))).app_send
    assert find_socket(chain) is marker

    inner = UvicornCycle(marker).send

    async def wrapped_send(message):  # a middleware's closure over the next send
        await inner(message)

    assert find_socket(wrapped_send) is marker
    assert find_socket(lambda m: None) is None
    assert find_socket(None) is None


def run(coro):
    return asyncio.run(coro)


def test_forwarding_header_is_refused_and_hop_is_reported_on_request(monkeypatch):
    async def fake_flow(flow, backend=None):
        return protected_token()

    monkeypatch.setattr(aio, "ptoken_for_flow", fake_flow)
    client, server = ("10.0.0.1", 40000), ("10.0.0.2", 443)
    info = run(aio.connection_info(client=client, server=server, headers=[(b"x-forwarded-for", b"192.0.2.1")]))
    assert info["proxied"] and info["source"] == "refused" and info["itoken"] is None
    assert not info["ptoken"].protected and "reverse proxy" in info["ptoken"].information_string
    plain = run(aio.connection_info(client=client, server=server))
    assert plain["source"] == "flow" and plain["ptoken"].protected and plain["itoken"].pub_key_id == KEY
    assert plain["flow"].remote_addr.exploded == "10.0.0.1"
    # "testclient" or a Unix peer is no IP flow: nothing to judge, refused
    assert run(aio.connection_info(client=("testclient", 50000), server=("testserver", 80)))["source"] == "refused"


def test_socket_whose_peer_is_not_scope_client_is_refused(monkeypatch):
    """The server rewrote scope['client'] from a proxy's headers: the peer is the proxy."""
    monkeypatch.setattr(aio, "_peer_sync", lambda sock, be: (protected_token(), ("10.0.0.9", 5555)))

    async def fake_backend(backend=None):
        return None

    monkeypatch.setattr(aio, "resolve_backend", fake_backend)
    with socket.socket() as s:
        info = run(aio.connection_info(sock=s, client=("198.51.100.1", 1234), server=("10.0.0.2", 80)))
        assert info["proxied"] and not info["ptoken"].protected and info["hop_ptoken"].protected
        same = run(aio.connection_info(sock=s, client=("10.0.0.9", 5555), server=("10.0.0.2", 80)))
        assert same["source"] == "socket" and same["ptoken"].protected and not same["proxied"]
        hop = run(aio.connection_info(sock=s, client=("198.51.100.1", 1234), server=("10.0.0.2", 80), forwarded="hop"))
        assert hop["proxied"] and hop["ptoken"].protected
    with socket.socket(socket.AF_UNIX) as u:
        info = run(aio.connection_info(sock=u, client=None, server=None))
        assert info["proxied"] and "Unix" in info["reason"]


def test_demand_pin_key_and_check():
    want = aio.demand(aio.pin_key(KEY), min_privacy=Setting.LEVEL_MEDIUM)
    assert aio.check({"ptoken": protected_token()}, want) == []
    assert any("pubKeyID" in p for p in aio.check({"ptoken": protected_token(KEY[:-1] + b"\x00")}, want))
    assert aio.check({"ptoken": unprotected_ptoken(None, "clear")}, want)
    assert aio.check(None, want)
    high = aio.demand(min_privacy=Setting.LEVEL_HIGH)
    assert aio.check({"ptoken": protected_token()}, high) == []
    pem = (
        b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
        b"-----END PUBLIC KEY-----\n"
    )
    assert aio.pin_key(pem).pub_key_id == KEY


def test_middleware_require_denies_http_and_websocket(monkeypatch, no_daemon):
    starlette = pytest.importorskip("starlette")
    del starlette
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from btns_vici.asgi import IPsecMiddleware

    async def fake_flow(flow, backend=None):
        return unprotected_ptoken(flow, "no SA")

    monkeypatch.setattr(aio, "ptoken_for_flow", fake_flow)

    async def home(request):
        return PlainTextResponse("hi")

    async def ws(websocket):
        await websocket.accept()
        await websocket.close()

    app = IPsecMiddleware(Starlette(routes=[Route("/", home), WebSocketRoute("/ws", ws)]), require=aio.demand())
    with TestClient(app, client=("10.0.0.1", 40000), base_url="http://10.0.0.2") as c:
        r = c.get("/")
        assert r.status_code == 403 and "no SA" in r.json()["problems"][0]
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/ws"):
            pass
    with pytest.raises(ValueError):
        IPsecMiddleware(app, forwarded="guess")


def test_lifespan_and_other_scopes_pass_through(no_daemon):
    from btns_vici.asgi import IPsecMiddleware

    got = []

    async def app(scope, receive, send):
        got.append(scope)

    run(IPsecMiddleware(app)({"type": "lifespan"}, None, None))
    assert got == [{"type": "lifespan"}]


def test_core_imports_no_web_framework():
    code = (
        "import sys, btns_vici, btns_vici.aio, btns_vici.api, btns_vici.capi; "
        "bad = [m for m in ('starlette', 'fastapi', 'aiohttp', 'uvicorn', 'hypercorn') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_executor_works_after_fork():
    async def twice():
        return await aio.run_blocking(lambda: 2 * 21)

    assert run(twice()) == 42  # the parent's pool exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's threads are gone; a new pool must be made
        try:
            os.write(w, b"ok" if asyncio.run(asyncio.wait_for(twice(), 5)) == 42 else b"no")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 2) == b"ok"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
