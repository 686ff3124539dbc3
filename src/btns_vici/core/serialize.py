"""The canonical, versioned binary form of an iToken (draft section 2: "serializable token").

Layout (all integers big-endian, so a serialized iToken moves between hosts)::

    magic   4 bytes  b"BTiT"
    version 1 byte   1
    count   1 byte   number of records that follow
    record  count times: attr u16, length u16, value

Records are in strictly ascending attribute order, each attribute at most once.
Integers are 2-byte values, strings UTF-8 without their NUL, pubKeyID raw bytes.
Authentication-method switches that are ANY (the default) are omitted. Hence
one iToken has exactly one encoding, and every accepted input re-encodes to
itself. Parsing is linear in the input and refuses inputs over MAX_SERIALIZED.
"""

from __future__ import annotations

import struct

from .constants import ITOKEN_ATTRS, ITOKEN_AUTH_SWITCHES, STRING_ATTRS, UINT16_ATTRS, Attr, Setting
from .errors import SerializationError, TokenAttributeError
from .tokens import IToken

MAGIC = b"BTiT"
VERSION = 1
MAX_SERIALIZED = 32768
_HEAD = struct.Struct(">4sBB")
_REC = struct.Struct(">HH")
_U16BE = struct.Struct(">H")


def itoken_to_bytes(token: IToken) -> bytes:
    attrs = token.attributes()
    records = []
    for attr in sorted(attrs):
        value = attrs[attr]
        if attr in ITOKEN_AUTH_SWITCHES and value == Setting.ANY:
            continue
        if attr in UINT16_ATTRS:
            raw = _U16BE.pack(value)
        elif attr in STRING_ATTRS:
            raw = value.encode("utf-8")  # type: ignore[union-attr]
        else:
            raw = value  # type: ignore[assignment]
        records.append(_REC.pack(attr, len(raw)) + raw)
    return _HEAD.pack(MAGIC, VERSION, len(records)) + b"".join(records)


def itoken_from_bytes(data: bytes) -> IToken:
    """Parse a serialized iToken; SerializationError (EINVAL) for anything not canonical."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"serialized iToken must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_SERIALIZED:
        raise SerializationError(f"serialized iToken longer than {MAX_SERIALIZED} bytes")
    if len(data) < _HEAD.size:
        raise SerializationError("serialized iToken truncated (header)")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SerializationError("not a serialized iToken (bad magic)")
    if version != VERSION:
        raise SerializationError(f"unsupported iToken serialization version {version}")
    tok = IToken()
    pos, last = _HEAD.size, 0
    for _ in range(count):
        if pos + _REC.size > len(data):
            raise SerializationError("serialized iToken truncated (record header)")
        attr_id, length = _REC.unpack_from(data, pos)
        pos += _REC.size
        if attr_id <= last:
            raise SerializationError("records out of order or repeated")
        last = attr_id
        if attr_id not in {int(a) for a in ITOKEN_ATTRS}:
            raise SerializationError(f"unknown iToken attribute {attr_id}")
        attr = Attr(attr_id)
        raw = data[pos : pos + length]
        if len(raw) != length:
            raise SerializationError("serialized iToken truncated (value)")
        pos += length
        try:
            if attr in UINT16_ATTRS:
                if length != _U16BE.size:
                    raise SerializationError(f"{attr.name}: integer of length {length}")
                value: object = _U16BE.unpack(raw)[0]
                if attr in ITOKEN_AUTH_SWITCHES and value == Setting.ANY:
                    raise SerializationError(f"{attr.name}: ANY is the default and is not encoded")
            elif attr in STRING_ATTRS:
                value = raw.decode("utf-8")
            else:
                value = raw
            tok._set_internal(attr, value)
        except UnicodeDecodeError:
            raise SerializationError(f"{attr.name}: not valid UTF-8") from None
        except TokenAttributeError as exc:
            raise SerializationError(f"invalid value: {exc.strerror}") from None
    if pos != len(data):
        raise SerializationError("trailing bytes after serialized iToken")
    return tok


__all__ = ["MAX_SERIALIZED", "itoken_from_bytes", "itoken_to_bytes"]
