"""A FastAPI service that serves only IPsec-authenticated peers (btns-vici[asgi]).

Every route depends on ``require_ipsec``: a request that did not come through a verified
IPsec SA (a clear address, a proxy, a peer with another key) gets 403; a WebSocket is
closed before it is accepted (the server answers 403). The peer's key and channel
binding come from ``scope["extensions"]["btns"]``, which IPsecMiddleware fills in.

    BTNS_VICI_SOCKET=/run/charon.vici BTNS_EXAMPLE_PEER_KEY=client.pem \\
        uvicorn --app-dir examples/fastapi_ipsec app:app --host 0.0.0.0 --port 8000

Environment: ``BTNS_EXAMPLE_PEER_KEY``, a PEM public key: only that raw-key peer is served
(unset: any IPsec-authenticated peer); ``BTNS_EXAMPLE_MIN_PRIVACY``: ENABLE (default),
LEVEL_LOW, LEVEL_MEDIUM or LEVEL_HIGH. The backend is the default selection
(``BTNS_BACKEND``, ``BTNS_VICI_SOCKET``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from fastapi import Depends, FastAPI, WebSocket

from btns_vici import Setting
from btns_vici.aio import pin_key
from btns_vici.asgi import IPsecMiddleware, require_ipsec
from btns_vici.core.tokens import IToken


def describe(info: dict[str, Any]) -> dict[str, Any]:
    """What the service shows a peer about itself."""
    tok, peer = info["ptoken"], info["itoken"]
    key = peer.pub_key_id if peer is not None else None
    return {
        "protected": tok.protected,
        "source": info["source"],
        "privacy": Setting(tok.privacy_protected).name,
        "integrity": Setting(tok.integrity_protected).name,
        "policy": tok.policy_name,
        "peer_auth": peer.authentication_method.name if peer is not None and peer.authentication_method else None,
        "peer_key_sha256": hashlib.sha256(key).hexdigest() if key else None,
        "channel_binding": peer.channel_binding if peer is not None else None,
        "information": tok.information_string,
    }


def create_app(peer: IToken | None = None, min_privacy: Setting = Setting.ENABLE, backend: Any = None) -> Any:
    ipsec = Depends(require_ipsec(peer=peer, min_privacy=min_privacy))
    api = FastAPI(title="IPsec peers only", dependencies=[ipsec])

    @api.get("/whoami")
    async def whoami(btns: dict = ipsec) -> dict[str, Any]:
        return describe(btns)

    @api.websocket("/ws")
    async def ws(websocket: WebSocket, btns: dict = ipsec) -> None:
        await websocket.accept()
        await websocket.send_json(describe(btns))
        await websocket.close()

    return IPsecMiddleware(api, backend)


def _from_env() -> Any:
    path = os.environ.get("BTNS_EXAMPLE_PEER_KEY")
    peer = pin_key(open(path, "rb").read()) if path else None
    level = Setting[os.environ.get("BTNS_EXAMPLE_MIN_PRIVACY", "ENABLE")]
    return create_app(peer, level)


app = _from_env()
