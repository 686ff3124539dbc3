"""The leap-of-faith key exchange on the wire (README "Leap of faith"). Pure: bytes in, records out.

Every datagram starts with a 24-byte header::

    0   4  magic "BTKL"
    4   1  version (1)
    5   1  type: 1 HELLO, 2 COOKIE, 3 KEYREQ, 4 KEY, 5 REFUSED
    6   2  reserved, zero
    8  16  nonce (chosen by the initiator, echoed in every answer)

and has a fixed size per type (anything else is dropped unparsed)::

    HELLO   128  header, 104 zero bytes (padding: the answer is never larger than the question)
    COOKIE   40  header, cookie (16)
    KEYREQ  256  header, cookie (16), alg (1, 1 = Ed25519), initiator key (32), signature (64), zero padding
    KEY     121  header, alg (1), responder key (32), signature (64)
    REFUSED  25  header, reason (1)

Signatures (Ed25519, proof of possession of the key sent, bound to this exchange)::

    KEYREQ: sign(k_i, "btns-leap-v1 I" | nonce | cookie | key_i)
    KEY:    sign(k_r, "btns-leap-v1 R" | nonce | cookie | key_i | key_r)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"BTKL"
VERSION = 1
HELLO, COOKIE, KEYREQ, KEY, REFUSED = 1, 2, 3, 4, 5
HEADER = struct.Struct("!4sBBH16s")
NONCE_LEN = COOKIE_LEN = 16
KEY_LEN, SIG_LEN = 32, 64
ALG_ED25519 = 1
SIZES = {HELLO: 128, COOKIE: 40, KEYREQ: 256, KEY: 121, REFUSED: 25}
MAX_DATAGRAM = max(SIZES.values())
#: REFUSED reasons
R_CONFIGURED, R_PINNED, R_BUSY, R_POLICY = 1, 2, 3, 4
REASONS = {
    R_CONFIGURED: "the operator configured a stronger method for this address",
    R_PINNED: "the responder pinned another key for this address",
    R_BUSY: "the responder is busy",
    R_POLICY: "refused by the responder's policy",
}
#: Ed25519 SubjectPublicKeyInfo DER = this prefix + the 32-byte key
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class WireError(ValueError):
    """A datagram that is not a well-formed message (it is dropped without an answer)."""


@dataclass(frozen=True)
class Message:
    type: int
    nonce: bytes
    cookie: bytes = b""
    key: bytes = b""  # raw 32-byte Ed25519 public key
    sig: bytes = b""
    reason: int = 0


def _header(kind: int, nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise WireError("nonce must be 16 bytes")
    return HEADER.pack(MAGIC, VERSION, kind, 0, nonce)


def _pad(body: bytes, kind: int) -> bytes:
    size = SIZES[kind]
    if len(body) > size:
        raise WireError("message too long")
    return body + bytes(size - len(body))


def _check(value: bytes, n: int, what: str) -> bytes:
    if len(value) != n:
        raise WireError(f"{what} must be {n} bytes")
    return value


def hello(nonce: bytes) -> bytes:
    return _pad(_header(HELLO, nonce), HELLO)


def cookie_msg(nonce: bytes, cookie: bytes) -> bytes:
    return _header(COOKIE, nonce) + _check(cookie, COOKIE_LEN, "cookie")


def keyreq(nonce: bytes, cookie: bytes, key: bytes, sig: bytes) -> bytes:
    body = (
        _header(KEYREQ, nonce)
        + _check(cookie, COOKIE_LEN, "cookie")
        + bytes([ALG_ED25519])
        + _check(key, KEY_LEN, "key")
        + _check(sig, SIG_LEN, "signature")
    )
    return _pad(body, KEYREQ)


def key_msg(nonce: bytes, key: bytes, sig: bytes) -> bytes:
    return _header(KEY, nonce) + bytes([ALG_ED25519]) + _check(key, KEY_LEN, "key") + _check(sig, SIG_LEN, "signature")


def refused(nonce: bytes, reason: int) -> bytes:
    if not 0 <= reason <= 255:
        raise WireError("reason out of range")
    return _header(REFUSED, nonce) + bytes([reason])


def parse(data: bytes) -> Message:
    """One datagram -> Message; WireError for anything malformed (size, magic, version, padding)."""
    if len(data) < HEADER.size:
        raise WireError("shorter than the header")
    magic, version, kind, reserved, nonce = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad magic")
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    if reserved != 0:
        raise WireError("reserved bits set")
    size = SIZES.get(kind)
    if size is None:
        raise WireError(f"unknown type {kind}")
    if len(data) != size:
        raise WireError(f"type {kind} must be {size} bytes, not {len(data)}")
    rest = data[HEADER.size :]
    if kind == HELLO:
        if any(rest):
            raise WireError("padding not zero")
        return Message(HELLO, nonce)
    if kind == COOKIE:
        return Message(COOKIE, nonce, cookie=rest)
    if kind == REFUSED:
        return Message(REFUSED, nonce, reason=rest[0])
    if kind == KEYREQ:
        cookie, alg, key, sig = rest[:16], rest[16], rest[17:49], rest[49:113]
        if any(rest[113:]):
            raise WireError("padding not zero")
    else:  # KEY
        cookie, alg, key, sig = b"", rest[0], rest[1:33], rest[33:97]
    if alg != ALG_ED25519:
        raise WireError(f"unknown key algorithm {alg}")
    return Message(kind, nonce, cookie=cookie, key=key, sig=sig)


def keyreq_transcript(nonce: bytes, cookie: bytes, key_i: bytes) -> bytes:
    return b"btns-leap-v1 I" + nonce + cookie + key_i


def key_transcript(nonce: bytes, cookie: bytes, key_i: bytes, key_r: bytes) -> bytes:
    return b"btns-leap-v1 R" + nonce + cookie + key_i + key_r


def make_cookie(secret: bytes, addr: str, port: int, nonce: bytes) -> bytes:
    """The stateless return-routability cookie: HMAC-SHA256(secret, address | port | nonce)[:16]."""
    ip = ipaddress.ip_address(addr)
    packed = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    return hmac.new(secret, packed + struct.pack("!H", port) + nonce, hashlib.sha256).digest()[:COOKIE_LEN]


def spki_of(raw: bytes) -> bytes:
    """Raw Ed25519 key -> DER SubjectPublicKeyInfo (what charon and the iTokens use)."""
    return ED25519_SPKI_PREFIX + _check(raw, KEY_LEN, "key")


def raw_of(spki: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of an Ed25519 key -> its raw 32 bytes (WireError for any other key)."""
    if len(spki) != len(ED25519_SPKI_PREFIX) + KEY_LEN or not spki.startswith(ED25519_SPKI_PREFIX):
        raise WireError("only Ed25519 host keys are exchanged (protocol version 1)")
    return spki[len(ED25519_SPKI_PREFIX) :]
