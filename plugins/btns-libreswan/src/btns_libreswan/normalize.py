"""Parsed whack output (+ the configured raw keys) -> btns_vici's normalized SA records. Pure.

Authentication, from the conn's ``our auth:``/``their auth:`` words:

* ``null`` / ``AUTH_NULL`` (RFC 7619) -> ``AuthMethod.BTNS``: no key, no channel binding.
* ``secret`` / ``PSK`` -> ``AuthMethod.PRESHAREDKEY``.
* ``rsasig`` / ``RSASIG`` / ``ECDSA`` with a DN identity -> ``PKIX_TRUSTED`` (a CA-signed cert);
  otherwise a raw public key -> ``BTNS`` with the configured key as SPKI DER, as the strongSwan
  backend reports raw keys (the same peer key gives the same iToken whatever the daemon).
* ``eaponly`` -> ``EAP``; ``never`` or nothing -> ``NONE``.

When a conn accepts several methods (``RSASIG+AUTH_NULL``) pluto does not say
which one the peer used, so the weakest is reported (fail closed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from btns_vici.core.constants import AuthMethod
from btns_vici.core.records import ChildSA, Identity, IkeSA

from .ipsecconf import ConnKeys
from .parse import Conn, State, Status, Traffic, parse_selectors, split_alg, split_encr
from .rsakey import KeyFormatError, ckaid, keyid

BACKEND = "libreswan"
# Weakest first: the order in which a choice among several methods is reported.
_WEAKNESS = [AuthMethod.NONE, AuthMethod.BTNS, AuthMethod.PRESHAREDKEY, AuthMethod.EAP, AuthMethod.PKIX_TRUSTED]
_V1_IKE_ESTABLISHED = {"MAIN_I4", "MAIN_R3", "AGGR_I2", "AGGR_R2"}
_V1_IPSEC_ESTABLISHED = {"QUICK_I2", "QUICK_R2"}


def _bare_state(name: str) -> str:
    return name.removeprefix("STATE_").removeprefix("V2_")


def is_ipsec_state(st: State) -> bool:
    """True for an IPsec (CHILD) SA, established or not."""
    bare = _bare_state(st.state)
    return st.parent is not None or "CHILD" in bare or bare.startswith("QUICK")


def ike_state(st: State) -> str:
    bare = _bare_state(st.state)
    return "ESTABLISHED" if bare == "ESTABLISHED_IKE_SA" or bare in _V1_IKE_ESTABLISHED else bare


def child_state(st: State) -> str:
    bare = _bare_state(st.state)
    return "INSTALLED" if bare == "ESTABLISHED_CHILD_SA" or bare in _V1_IPSEC_ESTABLISHED else bare


def _idtype(text: str) -> str:
    return text.upper().removeprefix("ID_")


def _auth_tokens(word: str) -> list[str]:
    return [t.strip().upper() for t in word.replace("(", "+").replace(")", "").replace(",", "+").split("+")]


def null_possible(word: str, idtype: str) -> bool:
    """True when the end may have used RFC 7619 NULL authentication (then it has no key)."""
    return _idtype(idtype) == "NULL" or any(t in ("NULL", "AUTH_NULL") for t in _auth_tokens(word))


def auth_method(word: str, idtype: str) -> AuthMethod:
    """One end's method from pluto's auth word and that end's id type (weakest of a set)."""
    found = set()
    for t in _auth_tokens(word):
        if t in ("NULL", "AUTH_NULL"):
            found.add(AuthMethod.BTNS)
        elif t in ("SECRET", "PSK"):
            found.add(AuthMethod.PRESHAREDKEY)
        elif t.startswith(("RSASIG", "RSA", "ECDSA", "EDDSA")):
            dn = _idtype(idtype) in ("DER_ASN1_DN", "ASN1_DN", "DN")
            found.add(AuthMethod.PKIX_TRUSTED if dn else AuthMethod.BTNS)
        elif t in ("EAPONLY", "EAP"):
            found.add(AuthMethod.EAP)
        elif t in ("NEVER", ""):
            continue
    if _idtype(idtype) == "NULL":
        return AuthMethod.BTNS
    return next((m for m in _WEAKNESS if m in found), AuthMethod.NONE)


def _orient(keys: ConnKeys, conn: Conn) -> tuple[tuple[bytes | None, str], tuple[bytes | None, str]]:
    """((local key, ckaid), (remote key, ckaid)) of the configured conn, matching pluto's local end."""
    left_local = keys.left_host == conn.local_host or bool(keys.left_id and keys.left_id == conn.local_id)
    right_local = keys.right_host == conn.local_host or bool(keys.right_id and keys.right_id == conn.local_id)
    left, right = (keys.left_key, keys.left_ckaid), (keys.right_key, keys.right_ckaid)
    if left_local and not right_local:
        return left, right
    if right_local and not left_local:
        return right, left
    return (None, ""), (None, "")  # ambiguous: no key rather than maybe the wrong one


def _verified(key: tuple[bytes | None, str], ike_id: str, pubkeys: Mapping[str, set[str]] | None) -> bytes | None:
    """Keep a configured key only if pluto vouches for it.

    A key named by ``leftckaid=`` must have that CKAID (it came from pluto's NSS database);
    a key written in the config must be listed by ``--listpubkeys`` for that identity.
    """
    spki, configured_ckaid = key
    if spki is None:
        return None
    try:
        if configured_ckaid:
            return spki if ckaid(spki) == configured_ckaid.lower() else None
        if pubkeys is None:
            return spki
        return spki if keyid(spki) in pubkeys.get(ike_id, set()) else None
    except KeyFormatError:
        return None


def identity(conn: Conn, local: bool, key: bytes | None) -> Identity:
    """One end of the conn as an Identity record."""
    word, idtype, ike_id = (
        (conn.our_auth, conn.local_idtype, conn.local_id)
        if local
        else (conn.their_auth, conn.remote_idtype, conn.remote_id)
    )
    method = auth_method(word, idtype)
    if method is not AuthMethod.BTNS or null_possible(word, idtype):
        key = None  # NULL auth has no key (RFC 7619); PSK none; PKIX keys come from certificates
    dn = ike_id if method is AuthMethod.PKIX_TRUSTED else None
    return Identity(
        ike_id=ike_id or "%any",
        auth_method=method,
        public_key=key,
        certificate_dn=dn,
        auth_class=word.split("(")[0] or "none",
    )


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return ipaddress.ip_address("0.0.0.0")


def child_sa(st: State, conn: Conn, traffic: Traffic | None) -> ChildSA:
    """One IPsec SA state as a ChildSA record."""
    spis: dict[str, dict[str, int]] = {"in": {}, "out": {}}
    ordered: dict[str, list[int]] = {}
    for proto, spi, addr in st.saids:
        ordered.setdefault(proto, []).append(spi)
        if addr == conn.remote_host and addr != conn.local_host:
            spis["out"][proto] = spi
        elif addr == conn.local_host and addr != conn.remote_host:
            spis["in"][proto] = spi
    for proto, values in ordered.items():  # pluto prints outbound (@remote) first, then inbound
        if len(values) == 2:
            spis["out"].setdefault(proto, values[0])
            spis["in"].setdefault(proto, values[1])
    protocol = "ESP" if "esp" in ordered or conn.esp_alg else "AH"
    alg = split_alg(conn.esp_alg if protocol == "ESP" else conn.ah_alg)
    encr, bits = split_encr(alg[0]) if protocol == "ESP" and alg else (None, None)
    integ = (alg[1] if len(alg) > 1 else None) if protocol == "ESP" else (alg[0] if alg else None)
    if integ and integ.upper() == "NONE":
        integ = None
    return ChildSA(
        name=conn.key,
        uniqueid=str(st.serial),
        reqid=0,
        state=child_state(st),
        mode="TUNNEL" if "tun" in ordered else "TRANSPORT",
        protocol=protocol,
        spi_in=spis["in"].get(protocol.lower(), 0),
        spi_out=spis["out"].get(protocol.lower(), 0),
        encr_alg=encr,
        encr_keysize=bits,
        integ_alg=integ,
        local_ts=parse_selectors(conn.local_client, conn.local_host),
        remote_ts=parse_selectors(conn.remote_client, conn.remote_host),
        ipcomp_cpi_in=spis["in"].get("comp"),
        ipcomp_cpi_out=spis["out"].get("comp"),
        bytes_in=traffic.count("inBytes") if traffic else 0,
        bytes_out=traffic.count("outBytes") if traffic else 0,
    )


def ike_sas(
    status: Status,
    states: Mapping[int, State] | None = None,
    traffic: Mapping[int, Traffic] | None = None,
    conf_keys: Mapping[str, ConnKeys] | None = None,
    pubkeys: Mapping[str, set[str]] | None = None,
) -> list[IkeSA]:
    """Every IKE SA with its IPsec SAs. ``states`` from --showstates (else --status's own)."""
    states = status.states if states is None else states
    traffic = traffic or {}
    out = []
    for st in sorted(states.values(), key=lambda s: s.serial):
        conn = status.conns.get(st.conn_key)
        if conn is None or is_ipsec_state(st):
            continue
        keys = (conf_keys or {}).get(conn.name)
        lkey, rkey = _orient(keys, conn) if keys else ((None, ""), (None, ""))
        children = tuple(
            child_sa(c, status.conns.get(c.conn_key, conn), traffic.get(c.serial))
            for c in sorted(states.values(), key=lambda s: s.serial)
            if c.parent == st.serial and is_ipsec_state(c)
        )
        ike_alg = split_alg(conn.ike_alg)
        ike_encr, ike_bits = split_encr(ike_alg[0]) if ike_alg else (None, None)
        out.append(
            IkeSA(
                backend=BACKEND,
                name=conn.key,
                uniqueid=str(st.serial),
                version=conn.ike_version or (2 if st.state.startswith(("STATE_V2_", "ESTABLISHED_")) else 1),
                state=ike_state(st),
                local_host=_addr(conn.local_host),
                remote_host=_addr(conn.remote_host),
                local=identity(conn, True, _verified(lkey, conn.local_id, pubkeys)),
                remote=identity(conn, False, _verified(rkey, conn.remote_id, pubkeys)),
                children=children,
                encr_alg=ike_encr,
                prf_alg=ike_alg[1] if len(ike_alg) > 2 else None,
                dh_group=ike_alg[-1] if len(ike_alg) > 1 else None,
                extra={
                    "pluto_state": st.state,
                    "story": st.story,
                    "ike_alg": conn.ike_alg,
                    "ike_encr_keysize": str(ike_bits or ""),
                },
            )
        )
    return out
