"""Just enough DER to read an X.509 certificate: subject, issuer (as strongSwan prints DNs), SPKI.

charon's list-certs gives certificates as DER without their names; the backend
needs the subject to match the peer's IKE identity, the issuer for the iToken's
``certificateAuthorityDN`` (draft 2.1.2) and the SubjectPublicKeyInfo for ``pubKeyID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

_OID_NAMES = {
    "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C", "2.5.4.7": "L",
    "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.12": "T", "2.5.4.42": "G",
    "2.5.4.46": "dnQualifier", "1.2.840.113549.1.9.1": "E", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    spki: bytes  # DER SubjectPublicKeyInfo


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise ProtocolError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ProtocolError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ProtocolError("truncated DER value")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, value start, value end) of each element in [start, end)."""
    out = []
    pos = start
    while pos < end:
        tag, vs, ve = _tlv(data, pos)
        out.append((tag, pos, vs, ve))
        pos = ve
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise ProtocolError("empty OID")
    parts = [raw[0] // 40, raw[0] % 40]
    val = 0
    for b in raw[1:]:
        val = (val << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(val)
            val = 0
    return ".".join(map(str, parts))


def dn_string(data: bytes, start: int, end: int) -> str:
    """A Name (SEQUENCE OF RDN) as strongSwan prints it: ``C=CH, O=strongSwan, CN=moon``."""
    parts = []
    for _t, _s, rs, re_ in _children(data, start, end):  # RDN SETs
        for _t2, _s2, as_, ae in _children(data, rs, re_):  # AttributeTypeAndValue
            (t_oid, _, os_, oe), (_tv, _, vs, ve) = _children(data, as_, ae)[:2]
            if t_oid != 0x06:
                raise ProtocolError("DN attribute without OID")
            oid = _oid(data[os_:oe])
            value = data[vs:ve].decode("utf-8", errors="replace")
            parts.append(f"{_OID_NAMES.get(oid, oid)}={value}")
    return ", ".join(parts)


def parse_certificate(der: bytes) -> CertInfo:
    """Subject, issuer and SPKI of a DER X.509 certificate; ProtocolError if it is not one."""
    try:
        tag, vs, ve = _tlv(der, 0)
        if tag != 0x30:
            raise ProtocolError("certificate is not a SEQUENCE")
        tbs_tag, _, tvs, tve = _children(der, vs, ve)[0]
        if tbs_tag != 0x30:
            raise ProtocolError("tbsCertificate is not a SEQUENCE")
        fields = _children(der, tvs, tve)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
        issuer, subject, spki = fields[2], fields[4], fields[5]
    except IndexError as exc:
        raise ProtocolError("truncated certificate") from exc
    return CertInfo(
        subject=dn_string(der, subject[2], subject[3]),
        issuer=dn_string(der, issuer[2], issuer[3]),
        spki=der[spki[1] : spki[3]],
    )
