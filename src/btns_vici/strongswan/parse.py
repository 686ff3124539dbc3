"""VICI replies (nested dicts of bytes) -> :mod:`btns_vici.core.records`. Pure, no I/O.

list-sas and the SA events carry the IKE_SA and CHILD_SA state but neither the
authentication method nor the peer's key; those come from list-conns
(``remote-1.class``, ``certs``, ``cacerts``) and list-certs (PUBKEY entries are
DER SubjectPublicKeyInfo named by ``subject``; X509 entries are DER certificates).
Normalization (draft 2.1.2, iToken attributes):

* ``public key`` with a certificate from a CA -> PKIX_TRUSTED (certificate and CA DN filled);
* ``public key`` with a bare key (no certificate, no CA) -> BTNS (unanchored raw key);
* ``pre-shared key`` -> PRESHAREDKEY; ``EAP...`` -> EAP; ``XAuth...`` -> XAUTH; else NONE.

Anything malformed raises :class:`~btns_vici.core.errors.ProtocolError` (EPROTO).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.constants import AuthMethod
from ..core.errors import ProtocolError
from ..core.records import ChildSA, Identity, IkeSA
from ..core.selectors import PROTO_ANY, PROTO_NAMES, TrafficSelector

BACKEND = "strongswan"
Section = Mapping[str, Any]


def text(value: Any, what: str = "value") -> str:
    """A VICI scalar (bytes) as text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"VICI {what} is not UTF-8") from exc
    if isinstance(value, str):
        return value
    raise ProtocolError(f"VICI {what} is not a scalar: {type(value).__name__}")


def uniqueid(d: Section, what: str = "uniqueid") -> str:
    """A section's ``uniqueid``: charon's decimal counter (EPROTO for anything else)."""
    v = _req(d, "uniqueid")
    if not (v.isascii() and v.isdigit()) or len(v) > 20:
        raise ProtocolError(f"VICI {what} is not a decimal number: {v[:40]!r}")
    return v


def _get(d: Section, key: str, default: str | None = None) -> str | None:
    if d.__class__ is not dict and not isinstance(d, Mapping):  # (the decoder's dicts skip the ABC check)
        raise ProtocolError(f"VICI section expected, got {type(d).__name__}")
    v = d.get(key)
    return default if v is None else text(v, key)


def _req(d: Section, key: str) -> str:
    v = _get(d, key)
    if v is None:
        raise ProtocolError(f"VICI reply lacks {key!r}")
    return v


def _int(d: Section, key: str, default: int | None = None, base: int = 10) -> int | None:
    v = _get(d, key)
    if v is None:
        return default
    try:
        return int(v, base)
    except ValueError as exc:
        raise ProtocolError(f"VICI {key!r} is not a number: {v!r}") from exc


def _addr(v: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(v)
    except ValueError as exc:
        raise ProtocolError(f"VICI {what} is not an address: {v!r}") from exc


# -- traffic selectors -------------------------------------------------------------------------


class GarbledSelectorError(ProtocolError):
    """A traffic selector naming a protocol or port no name lookup knows (EPROTO).

    What charon sends when two of its threads format selectors at once (getprotobynumber and
    getservbyport are not reentrant; README "Backends", strongSwan): the index reads such a
    listing again instead of failing the answer."""


def _number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also says yes to "\u00b2", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _proto(name: str) -> int:
    if _number(name):
        return int(name)
    if name in PROTO_NAMES:
        return PROTO_NAMES[name]
    try:
        return socket.getprotobyname(name)
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in the name)
        raise GarbledSelectorError(f"unknown protocol {name!r} in traffic selector") from exc


def _port(name: str, proto: str) -> int:
    if _number(name):
        return int(name)
    try:
        return socket.getservbyname(name, proto)
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in the name)
        raise GarbledSelectorError(f"unknown port {name!r} in traffic selector") from exc


#: spec -> TrafficSelector and address part -> (start, end): a listing of 1,000 CHILD_SAs repeats
#: the same few selectors and addresses (TrafficSelector is frozen: sharing one is safe).
_TS_CACHE: dict[str, TrafficSelector] = {}
_RANGE_CACHE: dict[str, tuple[Any, Any]] = {}
_CACHE_MAX = 4096


def parse_ts(spec: str) -> TrafficSelector:
    """A strongSwan traffic selector string -> TrafficSelector.

    Forms: ``10.0.0.1/32``, ``10.0.0.1/32[tcp/20000]``, ``10.0.0.0/24[udp/5000-6000]``,
    ``fd00::1/128[tcp]``, ``10.0.0.1..10.0.0.9``, ``[47]``, ``[tcp/http]``, ``[icmp/8]``.
    """
    ts = _TS_CACHE.get(spec)
    if ts is None:
        ts = _parse_ts(spec)
        if len(_TS_CACHE) >= _CACHE_MAX:
            _TS_CACHE.clear()
        _TS_CACHE[spec] = ts
    return ts


def _range(addr: str) -> tuple[Any, Any]:
    """The first and last address of ``a.b.c.d/len`` or ``a..b`` (ValueError when bad)."""
    span = _RANGE_CACHE.get(addr)
    if span is None:
        if ".." in addr:
            a, b = addr.split("..", 1)
            span = (ipaddress.ip_address(a), ipaddress.ip_address(b))
        else:
            net = ipaddress.ip_network(addr, strict=False)
            span = (net.network_address, net.broadcast_address)
        if len(_RANGE_CACHE) >= _CACHE_MAX:
            _RANGE_CACHE.clear()
        _RANGE_CACHE[addr] = span
    return span


def _parse_ts(spec: str) -> TrafficSelector:
    addr, _, rest = spec.strip().partition("[")
    proto, port_lo, port_hi, opaque = PROTO_ANY, 0, 65535, False
    if rest:
        if not rest.endswith("]"):
            raise ProtocolError(f"bad traffic selector {spec!r}")
        pname, _, ports = rest[:-1].partition("/")
        proto = _proto(pname)
        if ports == "OPAQUE":  # RFC 4301 OPAQUE: matches no port
            opaque = True
        elif ports:
            port_lo, port_hi = _ports(ports, pname)
    try:
        start, end = _range(addr)
        if opaque:
            return TrafficSelector(start, end, proto, 0, 0)
        return TrafficSelector(start, end, proto, port_lo, port_hi)
    except ValueError as exc:
        raise ProtocolError(f"bad traffic selector {spec!r}: {exc}") from exc


#: A port range as charon prints one (``%d-%d``, low first); a single port is a number or a name.
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")


def _ports(text: str, proto: str) -> tuple[int, int]:
    """The ports of a selector: ``lo-hi``, ``N`` or a service name (getservbyport's, e.g.
    ``http-alt``: a hyphen inside a name is no range; charon prints ranges as numbers only)."""
    m = _PORT_RANGE.fullmatch(text)
    if m is not None:
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:  # never printed so by charon: a garbled listing
            raise GarbledSelectorError(f"reversed port range {text!r} in traffic selector")
        return lo, hi
    port = _port(text, proto)
    return port, port


def _ts_list(d: Section, key: str) -> tuple[TrafficSelector, ...]:
    raw = d.get(key, [])
    if not isinstance(raw, list):
        raise ProtocolError(f"VICI {key!r} is not a list")
    return tuple(parse_ts(text(x, key)) for x in raw)


# -- CHILD_SA and IKE_SA -----------------------------------------------------------------------


def parse_child(d: Section) -> ChildSA:
    """One entry of an IKE_SA's ``child-sas`` section."""
    cpi_in, cpi_out = _int(d, "cpi-in", None, 16), _int(d, "cpi-out", None, 16)
    return ChildSA(
        name=_req(d, "name"),
        uniqueid=uniqueid(d, "CHILD_SA uniqueid"),
        reqid=_int(d, "reqid", 0) or 0,
        state=_req(d, "state"),
        mode=_req(d, "mode"),
        protocol=_req(d, "protocol"),
        spi_in=_int(d, "spi-in", 0, 16) or 0,
        spi_out=_int(d, "spi-out", 0, 16) or 0,
        encr_alg=_get(d, "encr-alg"),
        encr_keysize=_int(d, "encr-keysize") or _default_keysize(_get(d, "encr-alg")),
        integ_alg=_get(d, "integ-alg"),
        local_ts=_ts_list(d, "local-ts"),
        remote_ts=_ts_list(d, "remote-ts"),
        encap=_get(d, "encap") == "yes",
        ipcomp_cpi_in=cpi_in,
        ipcomp_cpi_out=cpi_out,
        dh_group=_get(d, "dh-group"),
        bytes_in=_int(d, "bytes-in", 0) or 0,
        bytes_out=_int(d, "bytes-out", 0) or 0,
        packets_in=_int(d, "packets-in", 0) or 0,
        packets_out=_int(d, "packets-out", 0) or 0,
        install_time=_int(d, "install-time"),
        rekey_time=_int(d, "rekey-time"),
        life_time=_int(d, "life-time"),
    )


def _default_keysize(alg: str | None) -> int | None:
    """Fixed-size ciphers VICI prints without ``encr-keysize``."""
    return {"CHACHA20_POLY1305": 256, "3DES": 168, "DES": 56}.get((alg or "").upper())


def children_of(ike: Section) -> dict[str, ChildSA]:
    """The CHILD_SAs of a list-sas / child-updown IKE section, by CHILD_SA uniqueid."""
    kids = ike.get("child-sas", {})
    if not isinstance(kids, Mapping):
        raise ProtocolError("VICI child-sas is not a section")
    out = {}
    for c in kids.values():
        if not isinstance(c, Mapping):
            raise ProtocolError("VICI child-sas entry is not a section")
        child = parse_child(c)
        out[child.uniqueid] = child
    return out


def parse_ike(name: str, d: Section, local: Identity, remote: Identity, children: Iterable[ChildSA] = ()) -> IkeSA:
    """An IKE section (list-sas, events) with resolved identities -> IkeSA."""
    initiator = _get(d, "initiator") == "yes"
    ispi, rspi = _get(d, "initiator-spi", ""), _get(d, "responder-spi", "")
    extra = {k: text(v, k) for k, v in d.items() if isinstance(v, bytes)}
    return IkeSA(
        backend=BACKEND,
        name=name,
        uniqueid=uniqueid(d, "IKE_SA uniqueid"),
        version=_int(d, "version", 2) or 2,
        state=_req(d, "state"),
        local_host=_addr(_req(d, "local-host"), "local-host"),
        remote_host=_addr(_req(d, "remote-host"), "remote-host"),
        local=local,
        remote=remote,
        children=tuple(children),
        encr_alg=_get(d, "encr-alg"),
        integ_alg=_get(d, "integ-alg"),
        prf_alg=_get(d, "prf-alg"),
        dh_group=_get(d, "dh-group"),
        established=_int(d, "established"),
        local_spi=(ispi if initiator else rspi) or "",
        remote_spi=(rspi if initiator else ispi) or "",
        extra=extra,
    )


def single_section(msg: Section, what: str) -> tuple[str, Section]:
    """The one named section of a list-sas entry or an updown event (ignoring ``up``)."""
    names = [k for k, v in msg.items() if isinstance(v, Mapping)]
    if len(names) != 1:
        raise ProtocolError(f"VICI {what} has {len(names)} sections, expected 1")
    return names[0], msg[names[0]]


# -- identities --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertStore:
    """list-certs, indexed: raw keys by subject, X.509 certificates by subject DN and subjectAltNames."""

    pubkeys: Mapping[str, bytes]  # subject (identity or key id) -> DER SPKI
    certs: Mapping[str, tuple[str, str, bytes]]  # subject DN or SAN -> (subject DN, issuer DN, DER SPKI)

    @classmethod
    def from_vici(cls, entries: Iterable[Section]) -> CertStore:
        pubkeys: dict[str, bytes] = {}
        certs: dict[str, tuple[str, str, bytes]] = {}
        for e in entries:
            kind, data = _get(e, "type", ""), e.get("data")
            if not isinstance(data, bytes):
                raise ProtocolError("list-certs entry without data")
            if kind == "PUBKEY":
                subject = _get(e, "subject")
                if subject:
                    pubkeys[subject] = data
                # A raw key loaded without an id is known by its key id (SHA-1 of the DER SPKI).
                pubkeys.setdefault(_keyid(data), data)
            elif kind == "X509" and _get(e, "flag", "NONE") != "CA":
                from .der import parse_certificate  # cryptography loads only when a certificate is there

                info = parse_certificate(data)
                entry = (info.subject, info.issuer, info.spki)
                certs[info.subject] = entry
                for alt in info.alt_names:  # IKE identities are often a SAN, not the DN
                    certs.setdefault(alt, entry)
        return cls(pubkeys, certs)


def _keyid(spki: bytes) -> str:
    return ":".join(f"{b:02x}" for b in hashlib.sha1(spki).digest())


def auth_method(auth_class: str, has_ca: bool) -> AuthMethod:
    """A list-conns ``class`` -> the draft's authentication method (see module docstring)."""
    c = auth_class.strip().lower()
    if c == "public key":
        return AuthMethod.PKIX_TRUSTED if has_ca else AuthMethod.BTNS
    if c == "pre-shared key":
        return AuthMethod.PRESHAREDKEY
    if c.startswith("eap"):
        return AuthMethod.EAP
    if c.startswith("xauth"):
        return AuthMethod.XAUTH
    return AuthMethod.NONE


def identity(ike_id: str, auth: Section | None, store: CertStore) -> Identity:
    """One end of an IKE_SA: its id from list-sas, its auth round from list-conns."""
    if auth is None:
        return Identity(ike_id=ike_id, auth_method=AuthMethod.NONE, auth_class="unknown")
    cls = _get(auth, "class", "") or ""
    cacerts = [text(x, "cacerts") for x in auth.get("cacerts", []) or []]
    named = [text(x, "certs") for x in auth.get("certs", []) or []]
    cert = store.certs.get(ike_id) or next((store.certs[n] for n in named if n in store.certs), None)
    if cls.strip().lower() == "public key" and (cert is not None or cacerts):
        subject, issuer, spki = cert if cert is not None else (None, cacerts[0], None)
        return Identity(
            ike_id=ike_id,
            auth_method=AuthMethod.PKIX_TRUSTED,
            public_key=spki,
            certificate_dn=subject,
            ca_dn=issuer,
            auth_class=cls,
        )
    key = store.pubkeys.get(ike_id) or next((store.pubkeys[n] for n in named if n in store.pubkeys), None)
    return Identity(
        ike_id=ike_id,
        auth_method=auth_method(cls, False),
        public_key=key if cls.strip().lower() == "public key" else None,
        auth_class=cls,
    )


def conn_auth(conn: Section, side: str) -> Section | None:
    """The first auth round (``local-1``/``remote-1``) of a list-conns section."""
    rounds = sorted(k for k in conn if k.startswith(f"{side}-") and isinstance(conn[k], Mapping))
    return conn[rounds[0]] if rounds else None
