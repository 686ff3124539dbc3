"""require_ipsec under FastAPI (no ``from __future__ import annotations`` here: FastAPI reads the
endpoint annotations at run time)."""

from typing import Annotated

import pytest

from btns_vici import aio
from btns_vici.core.derive import unprotected_ptoken

from .test_asgi_unit import KEY, no_daemon, protected_token  # noqa: F401 (no_daemon: a fixture)

fastapi = pytest.importorskip("fastapi")


@pytest.mark.usefixtures("no_daemon")
def test_require_ipsec_answers_403_and_500_under_fastapi(monkeypatch):
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from btns_vici.asgi import IPsecMiddleware, require_ipsec

    verdict = {"tok": protected_token()}

    async def fake_flow(flow, backend=None):
        return verdict["tok"]

    monkeypatch.setattr(aio, "ptoken_for_flow", fake_flow)
    api = fastapi.FastAPI()

    @api.get("/pinned")
    async def pinned(btns: Annotated[dict, fastapi.Depends(require_ipsec(peer=aio.pin_key(KEY)))]):
        return {"cb": btns["itoken"].channel_binding, "source": btns["source"]}

    @api.websocket("/ws")
    async def ws(websocket: fastapi.WebSocket, btns: Annotated[dict, fastapi.Depends(require_ipsec())]):
        await websocket.accept()
        await websocket.send_json({"source": btns["source"]})
        await websocket.close()

    # TestClient's scope client is ("testclient", 50000): not an IP flow, refused: 403
    with TestClient(IPsecMiddleware(api)) as c:
        r = c.get("/pinned")
        assert r.status_code == 403 and "IPsec requirement not met" in r.text
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/ws"):
            pass
    with TestClient(IPsecMiddleware(api), client=("10.0.0.1", 40000), base_url="http://10.0.0.2") as c:
        r = c.get("/pinned")
        assert r.status_code == 200 and r.json()["source"] == "flow", r.text
        with c.websocket_connect("ws://10.0.0.2/ws") as w:
            assert w.receive_json() == {"source": "flow"}
        verdict["tok"] = protected_token(b"another key")
        assert c.get("/pinned").status_code == 403
        verdict["tok"] = unprotected_ptoken(None, "clear")
        assert c.get("/pinned").status_code == 403
    with TestClient(api) as c:  # no middleware: a configuration error, not a guess
        assert c.get("/pinned").status_code == 500
