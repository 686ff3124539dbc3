"""The connections the strongSwan backend builds from a pToken, as VICI ``load-conn`` messages. Pure.

What the library builds itself are raw-key connections (README "Enforcement"): our host key
against the peer's bare public key, proposals filtered by the demanded levels
(:data:`CANDIDATES`), the CHILD_SA mode the data plane can carry, and on kernel XFRM the
fixed :data:`XFRM_REQID` the socket guard names. The I/O (loading, initiating) is in
:mod:`.enforce`; the leap-of-faith learner builds its responder connections here too.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from .. import backendkit as kit
from ..core.constants import Attr, AuthMethod, Setting
from ..core.errors import NotSupportedError
from ..core.records import LIBIPSEC, XFRM
from ..core.requirements import allowed_methods, demanded, is_no_demand, operator_policy
from ..core.tokens import PToken
from ..hostkey import HostIdentity

#: ESP proposals the library offers, in preference order, with their (privacy, integrity) levels.
#: Non-GCM first: kernel-libipsec has no AES-GCM unless charon loads the gcm plugin.
CANDIDATES: tuple[kit.Proposal, ...] = (
    ("chacha20poly1305", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("aes256-sha384", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("aes256gcm16", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("aes256-sha256", Setting.LEVEL_HIGH, Setting.LEVEL_MEDIUM),
    ("aes128-sha256", Setting.LEVEL_MEDIUM, Setting.LEVEL_MEDIUM),
    ("aes128gcm16", Setting.LEVEL_MEDIUM, Setting.LEVEL_HIGH),
    ("aes128-sha1", Setting.LEVEL_MEDIUM, Setting.LEVEL_LOW),
    # Integrity-only ESP (ESP-NULL, RFC 2410 + an HMAC): offered only when privacy DISABLE is
    # demanded (requirements.choose_proposals), e.g. under TLS to avoid encrypting twice.
    ("null-sha384", Setting.DISABLE, Setting.LEVEL_HIGH),
    ("null-sha256", Setting.DISABLE, Setting.LEVEL_MEDIUM),
    ("null-sha1", Setting.DISABLE, Setting.LEVEL_LOW),
)
#: Methods strongSwan can authenticate with when the operator configured them.
OPERATOR_METHODS = frozenset({AuthMethod.PRESHAREDKEY, AuthMethod.PKIX_TRUSTED, AuthMethod.EAP})
#: kernel-xfrm: the reqid of every CHILD_SA the library negotiates, and of the guard's per-socket
#: policy templates. The kernel's outbound SA lookup matches a template's reqid exactly (0 is not
#: a wildcard there), so a guard with reqid 0 never finds charon's SAs: both must agree. A fixed
#: (static) reqid is shared by all of the library's CHILD_SAs; charon keeps them apart by address.
#: Chosen far above charon's dynamic reqids (1, 2, 3, ...); ASCII "btns".
XFRM_REQID = 0x62746E73


def esp_proposals(demand: PToken) -> list[str]:
    """The ESP proposals meeting the demanded privacy and integrity levels (EOPNOTSUPP if none)."""
    return kit.esp_proposals(demand, CANDIDATES)


def child_mode(demand: PToken, dataplane: str) -> str:
    """ "tunnel" or "transport" for the demanded tunnelMode/ipoptionsProtected on ``dataplane``."""
    tunnel, ipopts = demanded(demand, Attr.tunnelMode), demanded(demand, Attr.ipoptionsProtected)
    if tunnel == Setting.DISABLE and ipopts == Setting.ENABLE:
        raise NotSupportedError("IP options are protected only in tunnel mode (AH is not offered)")
    if dataplane == LIBIPSEC:
        if tunnel == Setting.DISABLE:
            raise NotSupportedError("kernel-libipsec supports tunnel mode only; transport mode needs kernel ESP")
        return "tunnel"
    if tunnel == Setting.ENABLE or ipopts == Setting.ENABLE:
        return "tunnel"
    return "transport"


def check_supported(demand: PToken, dataplane: str) -> None:
    """Raise EOPNOTSUPP for any requirement this backend on ``dataplane`` cannot meet."""
    if is_no_demand(demand):
        return
    if demanded(demand, Attr.privacyProtected) == Setting.DISABLE:
        if demanded(demand, Attr.integrityProtected) in (Setting.DISABLE, Setting.ANY):
            raise NotSupportedError(
                "privacy DISABLE without integrity asks for no IPsec at all: leave the pToken unset (all ANY) "
                "or demand integrity (ESP-NULL)"
            )
        if dataplane == LIBIPSEC:
            raise NotSupportedError(
                "kernel-libipsec has no ESP-NULL (its ESP context accepts no NULL cipher); integrity-only ESP "
                "needs kernel ESP (kernel-netlink, CONFIG_CRYPTO_NULL)"
            )
    if operator_policy(demand) is not None:
        child_mode(demand, dataplane)
        return  # the operator's connection decides proposals and authentication; verified after connecting
    esp_proposals(demand)
    child_mode(demand, dataplane)
    if demanded(demand, Attr.compressionAvailable) == Setting.ENABLE and dataplane == LIBIPSEC:
        raise NotSupportedError("kernel-libipsec has no IPComp")
    methods = allowed_methods(demand)
    if not methods & (kit.RAW_KEY_METHODS | OPERATOR_METHODS):
        names = ", ".join(sorted(m.name for m in methods)) or "none"
        raise NotSupportedError(f"strongSwan cannot authenticate with any allowed method ({names})")


def pinned_key(demand: PToken) -> bytes | None:
    tok = demand.itoken
    return tok.pub_key_id if tok is not None else None


def _pem(der: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(der)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _host_ts(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"{addr}/{addr.max_prefixlen}"


def conn_name(
    role: str, local: str, remote: str, demand: PToken, keys: list[bytes], dataplane: str, host_key: bytes = b""
) -> str:
    """A stable name per (role, endpoints, demand, our key): the same demand reuses its connection."""
    parts: list[str | bytes] = [local, remote, dataplane, *esp_proposals(demand), child_mode(demand, dataplane), *keys]
    if host_key:
        parts += [b"local-key", host_key]
    return kit.demand_name(role, *parts)


def conn_config(
    name: str,
    local_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    remote_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    host: HostIdentity,
    keys: list[bytes],
    demand: PToken,
    dataplane: str,
) -> dict[str, Any]:
    """The VICI load-conn message: initiator when ``remote_addr`` is given, else responder for any peer."""
    child: dict[str, Any] = {
        "local_ts": [_host_ts(local_addr)] if local_addr is not None else ["dynamic"],
        "remote_ts": [_host_ts(remote_addr)] if remote_addr is not None else ["dynamic"],
        "mode": child_mode(demand, dataplane),
        "esp_proposals": esp_proposals(demand),
        "start_action": "none",
        "dpd_action": "clear",
    }
    if demanded(demand, Attr.compressionAvailable) == Setting.ENABLE:
        child["ipcomp"] = "yes"
    if dataplane == XFRM:
        child["reqid"] = str(XFRM_REQID)
    return {
        name: {
            "version": "2",
            "local_addrs": [str(local_addr) if local_addr is not None else "%any"],
            "remote_addrs": [str(remote_addr) if remote_addr is not None else "%any"],
            "proposals": ["default"],
            "unique": "never",
            "local-1": {"auth": "pubkey", "pubkeys": [host.public_pem]},
            "remote-1": _remote_auth(keys),
            "children": {name: child},
        }
    }


def _remote_auth(keys: list[bytes]) -> dict[str, Any]:
    """Peer authentication by any of ``keys``; with several, no IDr is sent (any of them may answer)."""
    auth: dict[str, Any] = {"auth": "pubkey", "pubkeys": [_pem(k) for k in keys]}
    if len(keys) > 1:
        auth["id"] = "%any"
    return auth


def demand_allows_raw_keys(demand: PToken) -> bool:
    return kit.allows_raw_keys(demand)
