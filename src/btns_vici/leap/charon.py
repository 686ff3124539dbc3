"""What the leap-of-faith exchange asks of charon: is a stronger method configured, and the per-peer
responder connection for a learned key."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from ..backendkit import CONN_PREFIX
from ..core.tokens import PToken
from ..hostkey import HostIdentity
from ..strongswan.conns import conn_config
from ..strongswan.parse import text

#: Prefix of the per-peer responder connections the learner loads (a "btns-" name, like every
#: connection the library makes).
LEAP_PREFIX = CONN_PREFIX + "leap-"


def _covers(spec: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    spec = spec.strip()
    if not spec or spec.startswith("%"):  # %any, %any4, %any6: not a configuration of THIS peer
        return False
    try:
        if "-" in spec:
            lo, hi = (ipaddress.ip_address(x.strip()) for x in spec.split("-", 1))
            return lo.version == addr.version and int(lo) <= int(addr) <= int(hi)
        net = ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False  # a DNS name: charon resolves it; we cannot tell (documented)
    return net.version == addr.version and addr in net


def operator_conn_for(session: Any, addr: Any) -> tuple[str, str] | None:
    """(name, auth class) of a connection the operator configured for ``addr``'s IKE peer, if any.

    Only connections not made by the library (names not starting with ``btns-``) whose
    ``remote_addrs`` name this address or a range/subnet containing it count: for such a peer
    leap of faith would be a downgrade and is refused.
    """
    ip = ipaddress.ip_address(str(addr))
    for entry in session.list_conns():
        for name, conn in entry.items():
            if not isinstance(conn, dict) or name.startswith(CONN_PREFIX):
                continue
            remotes = [text(x) for x in conn.get("remote_addrs", []) or []]
            if any(_covers(r, ip) for r in remotes):
                auth = next((v for k, v in sorted(conn.items()) if k.startswith("remote-") and isinstance(v, dict)), {})
                return name, text(auth.get("class", b"?")) if auth else "?"
    return None


def peer_conn_name(peer: Any) -> str:
    return LEAP_PREFIX + hashlib.sha256(str(peer).encode()).hexdigest()[:12]


def load_peer_conn(session: Any, dataplane: str, host: HostIdentity, local: Any, peer: Any, spki: bytes) -> str:
    """Load (or replace) the responder connection that accepts ``peer`` authenticated by ``spki``."""
    name = peer_conn_name(peer)
    session.request("load-key", {"type": "any", "data": host.private_pem.decode()})
    cfg = conn_config(
        name, ipaddress.ip_address(str(local)), ipaddress.ip_address(str(peer)), host, [spki], PToken(), dataplane
    )
    session.request("load-conn", cfg)
    return name


def unload_peer_conn(session: Any, peer: Any) -> None:
    session.request("unload-conn", {"name": peer_conn_name(peer)})
