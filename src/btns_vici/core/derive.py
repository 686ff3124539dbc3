"""Normalized SA records -> iTokens and pTokens (draft 2.1.2 and 2.3.2). Pure.

The mapping from algorithms to LEVEL_LOW/MEDIUM/HIGH and the channel-binding
format are documented in README.md ("Protection levels", "Channel bindings").
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping

from .attributes import LEVEL_ATTRS, SWITCH_ATTRS
from .constants import Attr, AuthMethod, Setting
from .records import ChildSA, DataplaneProof, Identity, IkeSA, Protection
from .selectors import Flow, TrafficSelector
from .tokens import IToken, PToken

_AUTH_WORDS = {
    AuthMethod.NONE: "no authentication",
    AuthMethod.BTNS: "unauthenticated raw public key (BTNS)",
    AuthMethod.LEAPOFFAITH: "pinned raw public key (leap of faith)",
    AuthMethod.PRESHAREDKEY: "pre-shared key",
    AuthMethod.GROUPKEY: "group key",
    AuthMethod.XAUTH: "XAuth",
    AuthMethod.EAP: "EAP",
    AuthMethod.PKIX_TRUSTED: "X.509 certificate from a trusted CA",
    AuthMethod.PKIX_INLINE: "X.509 certificate received inline",
    AuthMethod.PKIX_OFFLINE: "X.509 certificate obtained offline",
}

_AEAD_PREFIXES = ("AES_GCM", "AES_CCM", "CHACHA20_POLY1305", "AES_GMAC", "CAMELLIA_CCM")
_NULL_ENCR = {None, "", "NULL", "AES_GMAC", "NULL_AES_GMAC"}  # GMAC authenticates only
_WEAK_ENCR = ("DES", "3DES", "DES_IV64", "DES_IV32", "BLOWFISH", "CAST", "RC5", "IDEA", "3IDEA")


def privacy_level(child: ChildSA) -> Setting:
    """Confidentiality strength of a CHILD_SA's encryption (README: "Protection levels")."""
    alg = (child.encr_alg or "").upper()
    if child.protocol.upper() != "ESP" or alg in _NULL_ENCR:
        return Setting.DISABLE
    if alg.startswith(_WEAK_ENCR):
        return Setting.LEVEL_LOW
    if alg.startswith("CHACHA20"):
        return Setting.LEVEL_HIGH
    bits = child.encr_keysize or 0
    if bits >= 192:
        return Setting.LEVEL_HIGH
    if bits >= 128:
        return Setting.LEVEL_MEDIUM
    return Setting.LEVEL_LOW


def integrity_level(child: ChildSA) -> Setting:
    """Integrity strength: AEAD ICV length, or the HMAC/MAC output length."""
    encr = (child.encr_alg or "").upper()
    if encr.startswith(_AEAD_PREFIXES):
        if encr.startswith(("CHACHA20_POLY1305", "AES_GMAC")) or encr.endswith("_16"):
            return Setting.LEVEL_HIGH
        if encr.endswith("_12"):
            return Setting.LEVEL_MEDIUM
        return Setting.LEVEL_LOW
    integ = (child.integ_alg or "").upper()
    if integ in ("", "NONE", "NULL"):
        return Setting.DISABLE
    if integ.startswith(("HMAC_SHA2_384", "HMAC_SHA2_512")):
        return Setting.LEVEL_HIGH
    if integ.startswith(("HMAC_SHA2_256", "AES_CMAC")):
        return Setting.LEVEL_MEDIUM
    return Setting.LEVEL_LOW  # HMAC_MD5_96, HMAC_SHA1_96, AES_XCBC_96, ...


def channel_binding(identity: Identity) -> str | None:
    """The ONE-SIDED peer-key binding of ``identity`` (README "Channel bindings": ``peer_key_binding``).

    Key-based methods bind to the SHA-256 of the peer's DER SubjectPublicKeyInfo;
    PSK/group keys can only bind to the claimed IKE identity; NULL/BTNS without a
    key has nothing authenticated to bind to (None). The two ends of one connection
    get different values from this (each names the other); the iToken attribute
    ``channelBinding`` is :func:`connection_binding`, equal at both ends.
    """
    if identity.public_key:
        return "btns-cb-v1:spki-sha256:" + hashlib.sha256(identity.public_key).hexdigest()
    if identity.auth_method in (AuthMethod.PRESHAREDKEY, AuthMethod.GROUPKEY):
        digest = hashlib.sha256(identity.ike_id.encode("utf-8")).hexdigest()
        return "btns-cb-v1:psk-id-sha256:" + digest
    return None


#: The documented name of the one-sided value (what ``channelBinding`` was before v2).
peer_key_binding = channel_binding

CONNECTION_BINDING_PREFIX = "btns-cb-v2:endpoints-sha256:"


def _endpoint_octets(identity: Identity) -> bytes | None:
    """What authenticated one end, as octets that cannot collide with another kind."""
    if identity.public_key:
        body, tag = identity.public_key, b"spki"
    elif identity.auth_method in (AuthMethod.PRESHAREDKEY, AuthMethod.GROUPKEY):
        body, tag = identity.ike_id.encode("utf-8"), b"psk-id"
    else:
        return None
    return tag + b"\0" + len(body).to_bytes(4, "big") + body


def connection_binding(a: Identity, b: Identity) -> str | None:
    """The end-point channel binding (RFC 5056 section 2.1) of a connection between ``a`` and ``b``.

    SHA-256 over both authenticated end-point identities in canonical (bytewise sorted)
    order, so both ends of one connection compute the same string whichever is local;
    None when either end authenticated nothing (NULL authentication). README "Channel bindings".
    """
    ea, eb = _endpoint_octets(a), _endpoint_octets(b)
    if ea is None or eb is None:
        return None
    h = hashlib.sha256(b"btns-cb-v2\0")
    for part in sorted((ea, eb)):
        h.update(len(part).to_bytes(4, "big") + part)
    return CONNECTION_BINDING_PREFIX + h.hexdigest()


def itoken_for(identity: Identity, other: Identity | None = None) -> IToken:
    """The iToken of one end of an IKE_SA (draft 2.1.2); ``other`` is the other end.

    With ``other`` its ``channelBinding`` is the connection's :func:`connection_binding`;
    without (an identity outside any connection, e.g. a host's exported key) it has none.
    """
    return _itoken_memo(identity, other).copy()


@functools.lru_cache(maxsize=4096)
def _itoken_memo(identity: Identity, other: Identity | None) -> IToken:
    """itoken_for is pure in the (frozen) Identities: build each iToken once (hot path of get_socket_pToken)."""
    what = _AUTH_WORDS.get(identity.auth_method, identity.auth_class)
    audit = f"id '{identity.ike_id}' authenticated by {what}"
    one_sided = channel_binding(identity)
    if one_sided:
        audit += f", peer-key-binding {one_sided}"
    return IToken.from_identity(
        authentication_method=identity.auth_method,
        pub_key_id=identity.public_key or None,
        certificate_dn=identity.certificate_dn,
        certificate_authority_dn=identity.ca_dn,
        channel_binding=connection_binding(identity, other) if other is not None else None,
        audit_string=audit,
    )


def _on(flag: bool) -> int:
    return int(Setting.ENABLE if flag else Setting.DISABLE)


def _alg_text(child: ChildSA) -> str:
    encr = child.encr_alg or "none"
    if child.encr_keysize:
        encr += f"-{child.encr_keysize}"
    return encr + (f"/{child.integ_alg}" if child.integ_alg else "")


def ptoken_for(protection: Protection) -> PToken:
    """The pToken of a flow verified to run through an SA (draft 2.3.2).

    Everything but the flow's own text depends only on (IKE_SA, CHILD_SA, proof); the
    backends hand out the same record objects until the SA changes, so that part is
    built once per SA and copied (get_socket_pToken's hot path).
    """
    ike, child, proof, flow = protection.ike_sa, protection.child_sa, protection.proof, protection.flow
    key = (id(ike), id(child), id(proof))
    hit = _TEMPLATES.get(key)
    if hit is None or hit[0] is not ike or hit[1] is not child or hit[2] is not proof:
        if len(_TEMPLATES) >= 1024:
            _TEMPLATES.clear()
        hit = _TEMPLATES[key] = (ike, child, proof, _ptoken_template(ike, child, proof))
    tmpl = hit[3]
    where = str(flow)
    return PToken._from_attributes(
        {
            Attr.auditString: f"{tmpl.audit_string} flow={where}",
            Attr.informationString: f"{where} {tmpl.information_string}",
        },
        base=tmpl,
    )


#: (id(ike), id(child), id(proof)) -> (ike, child, proof, template); the strong references keep ids unique.
_TEMPLATES: dict[tuple[int, int, int], tuple[IkeSA, ChildSA, DataplaneProof, PToken]] = {}


def _ptoken_template(ike: IkeSA, child: ChildSA, proof: DataplaneProof) -> PToken:
    """ptoken_for without the flow: audit and information strings lack the flow's text."""
    tunnel = child.mode.upper() == "TUNNEL"
    # As reported: the edge (backend.protect -> knownpeers.reported) has already made a raw-key
    # peer whose key the known-peers store held before this IKE_SA LEAPOFFAITH.
    remote = ike.remote
    attributes: dict[Attr, object] = {
        Attr.privacyProtected: int(privacy_level(child)),
        # Integrity is a property of both directions: if clear packets from the peer's address
        # can reach the socket (proof.inbound False), what it receives is not integrity-protected.
        Attr.integrityProtected: int(integrity_level(child) if proof.inbound else Setting.DISABLE),
        Attr.compressionAvailable: _on(child.ipcomp),
        Attr.tunnelMode: _on(tunnel),
        # Tunnel mode protects the whole inner header; in transport mode only AH covers options.
        Attr.ipoptionsProtected: _on(tunnel or child.protocol.upper() == "AH"),
        Attr.policyName: f"{ike.name}/{child.name}",
        Attr.iToken: itoken_for(remote, ike.local),
        Attr.remote_iToken: itoken_for(ike.local, remote),
        Attr.auditString: (
            f"backend={ike.backend} ike_sa={ike.name}#{ike.uniqueid} child_sa={child.name}#{child.uniqueid} "
            f"reqid={child.reqid} spi_in={child.spi_in:08x} spi_out={child.spi_out:08x} "
            f"proto={child.protocol} mode={child.mode} alg={_alg_text(child)} "
            f"peer_id={ike.remote.ike_id!r} dataplane={proof.dataplane} inbound={'sa' if proof.inbound else 'open'} "
            f"proof={proof.detail!r}"
            + (f" peer_record={ike.extra['peer_record']!r}" if "peer_record" in ike.extra else "")
        ),
        Attr.informationString: (
            f"is protected by IPsec {child.protocol} in {child.mode.lower()} mode "
            f"({_alg_text(child)}{', IPComp' if child.ipcomp else ''}) with peer '{ike.remote.ike_id}', "
            f"authenticated by {_AUTH_WORDS.get(remote.auth_method, remote.auth_class)}; "
            + ("" if proof.inbound else "received data is NOT integrity-protected (clear packets could reach it); ")
            + f"data plane {proof.dataplane}: {proof.detail}"
        ),
    }
    return PToken._from_attributes(attributes, child.local_ts, child.remote_ts)


def unprotected_ptoken(flow: Flow | None, reason: str) -> PToken:
    """The pToken of a flow no verified SA covers: every level and switch DISABLE, no iToken (fail closed)."""
    where = str(flow) if flow else "this socket"
    attributes: dict[Attr, object] = {attr: int(Setting.DISABLE) for attr in (*LEVEL_ATTRS, *SWITCH_ATTRS)}
    attributes[Attr.auditString] = f"unprotected flow={where} reason={reason}"
    attributes[Attr.informationString] = f"{where} is NOT protected by IPsec: {reason}"
    return PToken._from_attributes(attributes)


def restored_ptoken(
    attributes: Mapping[Attr, object],
    local_ts: Iterable[TrafficSelector] = (),
    remote_ts: Iterable[TrafficSelector] = (),
) -> PToken:
    """A pToken the library derived, rebuilt from its attributes (a broker's answer, a demo's JSON).

    Unlike an application's template it carries the read-only informationString. Every value is
    validated (EINVAL); trust only attributes this library produced.
    """
    return PToken._from_attributes(attributes, local_ts, remote_ts)


__all__ = [
    "IkeSA",
    "channel_binding",
    "connection_binding",
    "integrity_level",
    "itoken_for",
    "peer_key_binding",
    "privacy_level",
    "ptoken_for",
    "restored_ptoken",
    "unprotected_ptoken",
]
