"""X.509 certificates from list-certs: subject, issuer (as strongSwan prints DNs), SANs, SPKI.

charon's list-certs gives certificates as DER without their names; the backend
needs the subject and subjectAltNames to match the peer's IKE identity, the
issuer for the iToken's ``certificateAuthorityDN`` (draft 2.1.2) and the
SubjectPublicKeyInfo for ``pubKeyID``. Parsing is the ``cryptography`` package's.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..core.errors import ProtocolError

#: strongSwan's short names for DN attributes (others print as dotted OIDs, as strongSwan does).
_SHORT = {
    NameOID.COMMON_NAME: "CN",
    NameOID.SURNAME: "SN",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.COUNTRY_NAME: "C",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.TITLE: "T",
    NameOID.GIVEN_NAME: "G",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.EMAIL_ADDRESS: "E",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
}


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    spki: bytes  # DER SubjectPublicKeyInfo
    alt_names: tuple[str, ...] = ()  # DNS names, e-mail addresses and IP addresses


def dn_string(name: x509.Name) -> str:
    """A Name as strongSwan prints it, in DER order: ``C=CH, O=strongSwan, CN=moon``."""
    parts = []
    for rdn in name.rdns:
        for attr in rdn:
            value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
            parts.append(f"{_SHORT.get(attr.oid, attr.oid.dotted_string)}={value}")
    return ", ".join(parts)


def _alt_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for kind in (x509.DNSName, x509.RFC822Name):
        names += ext.get_values_for_type(kind)
    names += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def parse_certificate(der: bytes) -> CertInfo:
    """Subject, issuer, SANs and SPKI of a DER X.509 certificate; ProtocolError if it is not one."""
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return CertInfo(dn_string(cert.subject), dn_string(cert.issuer), spki, _alt_names(cert))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed certificate in list-certs: {exc}") from None
