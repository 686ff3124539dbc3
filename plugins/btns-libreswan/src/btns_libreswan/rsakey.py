"""libreswan's raw RSA keys <-> DER SubjectPublicKeyInfo. Pure, no dependencies.

libreswan writes ``leftrsasigkey=0s<base64>``: the RFC 3110 RSA/SHA-1 KEY RR
format (exponent length in 1 octet, or 0 then 2 octets; exponent; modulus).
``leftpubkey=<base64>`` is already a DER SubjectPublicKeyInfo (RFC 5280 4.1,
RFC 3279 2.3.1). The iToken's ``pubKeyID`` is the SPKI DER, so both forms are
brought to it with the tiny DER encoder below (definite lengths only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

# AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
_RSA_ALGID = bytes.fromhex("300d06092a864886f70d0101010500")


class KeyFormatError(ValueError):
    """Text or bytes that are not a well-formed RSA public key."""


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_uint(value: int) -> bytes:
    # A positive INTEGER: minimal octets plus a 0x00 when the top bit is set.
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return _tlv(0x02, body)


def spki_from_numbers(n: int, e: int) -> bytes:
    """DER SubjectPublicKeyInfo of the RSA key (n, e)."""
    if n <= 0 or e <= 0:
        raise KeyFormatError("RSA modulus and exponent must be positive")
    rsa_key = _tlv(0x30, _der_uint(n) + _der_uint(e))  # RSAPublicKey
    return _tlv(0x30, _RSA_ALGID + _tlv(0x03, b"\x00" + rsa_key))


def numbers_from_rfc3110(blob: bytes) -> tuple[int, int]:
    """(n, e) from an RFC 3110 public key blob."""
    if len(blob) < 3:
        raise KeyFormatError("RFC 3110 key too short")
    if blob[0] != 0:
        elen, off = blob[0], 1
    else:
        elen, off = int.from_bytes(blob[1:3], "big"), 3
    if elen == 0 or off + elen >= len(blob):
        raise KeyFormatError("RFC 3110 key: bad exponent length")
    e = int.from_bytes(blob[off : off + elen], "big")
    modulus = blob[off + elen :]
    if modulus[0] == 0:
        raise KeyFormatError("RFC 3110 key: modulus has a leading zero octet")
    return int.from_bytes(modulus, "big"), e


def rfc3110_from_numbers(n: int, e: int) -> bytes:
    """The RFC 3110 blob of (n, e), as libreswan prints after ``0s``."""
    eb = e.to_bytes((e.bit_length() + 7) // 8, "big")
    head = bytes([len(eb)]) if len(eb) <= 255 else b"\x00" + len(eb).to_bytes(2, "big")
    return head + eb + n.to_bytes((n.bit_length() + 7) // 8, "big")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"not base64: {exc}") from None


def decode_rsasigkey(text: str) -> bytes:
    """The RFC 3110 blob of a libreswan ``rsasigkey`` value (``0s`` base64 or ``0x`` hex)."""
    text = text.strip().strip('"')
    if text[:2].lower() == "0s":
        return _b64(text[2:])
    if text[:2].lower() == "0x":
        try:
            return bytes.fromhex(text[2:].replace("_", ""))
        except ValueError as exc:
            raise KeyFormatError(f"bad hex key: {exc}") from None
    raise KeyFormatError(f"unsupported rsasigkey encoding {text[:2]!r} (want 0s or 0x)")


def spki_from_rsasigkey(text: str) -> bytes:
    """libreswan ``leftrsasigkey=0s...`` -> DER SubjectPublicKeyInfo."""
    return spki_from_numbers(*numbers_from_rfc3110(decode_rsasigkey(text)))


# --- reading DER back (for ``leftpubkey=`` and the key id cross-check) ---------------------


def _read_tlv(data: bytes, off: int, tag: int) -> tuple[bytes, int]:
    if off + 2 > len(data) or data[off] != tag:
        raise KeyFormatError(f"DER: expected tag 0x{tag:02x} at offset {off}")
    length, off = data[off + 1], off + 2
    if length & 0x80:
        nlen = length & 0x7F
        if nlen == 0 or nlen > 4 or off + nlen > len(data):
            raise KeyFormatError("DER: bad length")
        length, off = int.from_bytes(data[off : off + nlen], "big"), off + nlen
    if off + length > len(data):
        raise KeyFormatError("DER: truncated")
    return data[off : off + length], off + length


def numbers_from_spki(der: bytes) -> tuple[int, int]:
    """(n, e) of an RSA SubjectPublicKeyInfo; KeyFormatError for anything else."""
    spki, end = _read_tlv(der, 0, 0x30)
    if end != len(der):
        raise KeyFormatError("DER: trailing bytes after SubjectPublicKeyInfo")
    if not spki.startswith(_RSA_ALGID):
        raise KeyFormatError("SubjectPublicKeyInfo is not rsaEncryption")
    bits, _ = _read_tlv(spki, len(_RSA_ALGID), 0x03)
    if not bits or bits[0] != 0:
        raise KeyFormatError("DER: bad BIT STRING")
    seq, _ = _read_tlv(bits, 1, 0x30)
    n, off = _read_tlv(seq, 0, 0x02)
    e, _ = _read_tlv(seq, off, 0x02)
    return int.from_bytes(n, "big"), int.from_bytes(e, "big")


def spki_from_pubkey(text: str) -> bytes:
    """libreswan ``leftpubkey=<base64 SPKI>`` -> DER, checked to be a well-formed RSA SPKI."""
    der = _b64(text.strip().strip('"'))
    numbers_from_spki(der)
    return der


def keyid(spki: bytes) -> str:
    """libreswan's short key id ("AwEAAdokY"): the first 9 base64 characters of the RFC 3110 blob."""
    return base64.b64encode(rfc3110_from_numbers(*numbers_from_spki(spki))).decode()[:9]


def ckaid(spki: bytes) -> str:
    """NSS's CKA_ID of an RSA key, as pluto prints it: SHA-1 of the modulus octets."""
    n, _ = numbers_from_spki(spki)
    return hashlib.sha1(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()
