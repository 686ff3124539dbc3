"""The private keys the library loads into charon (``load-key``), unloaded when nothing needs them.

charon names a private key by ``KEYID_PUBKEY_SHA1``: the SHA-1 of the subjectPublicKey BIT
STRING's contents (for Ed25519 the raw 32-byte key), what ``load-key`` answers as ``id`` and
``get-keys`` lists. The library's keys are the ``*.key`` files of its key directory
(:mod:`btns_vici.hostkey`); they are unloaded once charon has no ``btns-`` connection left
(any process's: the key is shared by every connection of that key directory).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any

from ..core.errors import BtnsError, ProtocolError
from . import parse

CONN_PREFIX = "btns-"


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at ``at``."""
    if at + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or at + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[at : at + n], "big")
        at += n
    if at + length > len(data):
        raise ValueError("truncated DER")
    return tag, at, at + length


def key_id(spki_der: bytes) -> str:
    """charon's id (hex) of the private key whose public half is ``spki_der`` (SubjectPublicKeyInfo)."""
    tag, start, _ = _tlv(spki_der, 0)
    if tag != 0x30:
        raise ValueError("not a SubjectPublicKeyInfo")
    tag, _, alg_end = _tlv(spki_der, start)  # AlgorithmIdentifier
    tag, bits, end = _tlv(spki_der, alg_end)
    if tag != 0x03 or end <= bits:
        raise ValueError("no subjectPublicKey BIT STRING")
    return hashlib.sha1(spki_der[bits + 1 : end]).hexdigest()  # charon's key id (not a security use)


def library_key_ids(options: Mapping[str, str]) -> set[str]:
    """Ids of the keys in the backend's key directory (never creates one)."""
    from cryptography.hazmat.primitives import serialization

    from ..hostkey import _check_private, key_dir

    out = set()
    directory = key_dir(options.get("key_dir"))
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob("*.key")):
            try:
                _check_private(path)
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                der = key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                out.add(key_id(der))
            except (OSError, ValueError, TypeError, BtnsError):
                continue
    return out


def unload_unused(session: Any, options: Mapping[str, str]) -> list[str]:
    """Unload the library's keys from charon when no ``btns-`` connection is left; their ids."""
    for entry in session.list_conns():
        if any(str(name).startswith(CONN_PREFIX) for name in entry):
            return []
    reply = session.request("get-keys")
    loaded = reply.get("keys") or []
    if not isinstance(loaded, list):
        raise ProtocolError("get-keys: keys is not a list")
    ids = {parse.text(k) for k in loaded}
    gone = []
    for kid in sorted(ids & library_key_ids(options)):
        session.request("unload-key", {"id": kid})
        gone.append(kid)
    return gone
