"""examples/fastapi_ipsec under a real uvicorn and a real hypercorn in peer B, clients in peer A.

Through the SA: served, with the client's key and channel binding. From a plain address (no SA
covers it): 403. Through the SA but with a key the service does not pin: 403. Through the SA
with a forwarding header (the peer would be a proxy): 403. The same for the WebSocket route.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("hypercorn")
ws_client = pytest.importorskip("websockets.sync.client")

from btns_lab.testbed import Testbed  # noqa: E402
from btns_vici.hostkey import load_or_create  # noqa: E402

pytestmark = pytest.mark.testbed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_ipsec"
SERVERS = ("uvicorn", "hypercorn")


@pytest.fixture
def sa(tb: Testbed) -> Testbed:
    tb.up("asgi-example", "rawkey", 4)
    return tb


@contextlib.contextmanager
def service(tb: Testbed, server: str, port: int, peer_key: Path | None) -> Iterator[subprocess.Popen]:
    """The example app under ``server`` in B's namespace, listening on every address of B."""
    env = {**os.environ, "BTNS_BACKEND": "strongswan", "BTNS_VICI_SOCKET": tb.b.vici_path, "PYTHONPATH": str(EXAMPLE)}
    env.pop("BTNS_EXAMPLE_PEER_KEY", None)
    if peer_key is not None:
        env["BTNS_EXAMPLE_PEER_KEY"] = str(peer_key)
    if server == "uvicorn":
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    else:
        cmd = [sys.executable, "-m", "hypercorn", "--bind", f"0.0.0.0:{port}", "--log-level", "warning", "app:app"]
    log = open(tb.workdir / f"{server}-{port}.log", "wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", tb.b.netns, *cmd], env=env, cwd=EXAMPLE, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{server} exited: {(tb.workdir / f'{server}-{port}.log').read_text()}")
            with tb.in_netns(tb.b), socket.socket() as probe:
                if probe.connect_ex((str(tb.b.v4_plain), port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{server} did not listen on {port}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()  # by pid: ip netns exec execs the server
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def get(tb: Testbed, url: str, local: str, **kw) -> httpx.Response:
    """GET from a socket in A's namespace, bound to ``local``."""
    with tb.in_netns(tb.a), httpx.Client(transport=httpx.HTTPTransport(local_address=local), timeout=10) as c:
        return c.get(url, **kw)


def ws_hello(tb: Testbed, host: str, port: int, local: str) -> dict:
    import json

    with tb.in_netns(tb.a):
        s = socket.socket()
    s.bind((local, 0))
    s.settimeout(10)
    s.connect((host, port))
    with ws_client.connect(f"ws://{host}:{port}/ws", sock=s, open_timeout=10) as ws:
        return json.loads(ws.recv(timeout=10))


def write_pem(tmp_path: Path, name: str, pem: bytes) -> Path:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(pem)
    return path


@pytest.mark.parametrize("server", SERVERS)
def test_example_serves_only_the_pinned_ipsec_peer(sa, tmp_path, server):
    tb = sa
    port = 28100 + SERVERS.index(server)
    a_key = write_pem(tmp_path, "a", tb.a.key.public_pem)
    with service(tb, server, port, a_key):
        ok = get(tb, f"http://{tb.b.v4}:{port}/whoami", str(tb.a.v4))
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["protected"] and body["source"] == "socket", body
        assert body["peer_key_sha256"] == hashlib.sha256(tb.a.key.public_der).hexdigest()
        assert body["channel_binding"].startswith("btns-cb-v2:endpoints-sha256:")  # both ends' keys
        assert body["privacy"].startswith("LEVEL_") and body["integrity"].startswith("LEVEL_")

        clear = get(tb, f"http://{tb.b.v4_plain}:{port}/whoami", str(tb.a.v4_plain))
        assert clear.status_code == 403, clear.text
        assert "NOT protected" in clear.text

        proxied = get(tb, f"http://{tb.b.v4}:{port}/whoami", str(tb.a.v4), headers={"X-Forwarded-For": "192.0.2.7"})
        assert proxied.status_code == 403 and "reverse proxy" in proxied.text, proxied.text

        hello = ws_hello(tb, str(tb.b.v4), port, str(tb.a.v4))
        assert hello["protected"] and hello["peer_key_sha256"] == body["peer_key_sha256"]
        with pytest.raises(Exception) as refused:
            ws_hello(tb, str(tb.b.v4_plain), port, str(tb.a.v4_plain))
        assert "403" in str(refused.value), refused.value


@pytest.mark.parametrize("server", SERVERS)
def test_example_pinned_to_another_key_refuses_the_ipsec_peer(sa, tmp_path, server):
    tb = sa
    port = 28110 + SERVERS.index(server)
    other = write_pem(tmp_path, "stranger", load_or_create(tmp_path / "stranger").public_pem)
    with service(tb, server, port, other):
        r = get(tb, f"http://{tb.b.v4}:{port}/whoami", str(tb.a.v4))
        assert r.status_code == 403, r.text
        assert "pubKeyID differs" in r.text
    with service(tb, server, port + 5, None):  # no pin: any IPsec-authenticated peer
        r = get(tb, f"http://{tb.b.v4}:{port + 5}/whoami", str(tb.a.v4))
        assert r.status_code == 200 and r.json()["protected"], r.text
