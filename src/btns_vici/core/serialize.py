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

The record values are the attribute table's wire form (:mod:`.attributes`). This module
works on attribute mappings; :meth:`IToken.to_bytes <btns_vici.core.tokens.IToken.to_bytes>`
and :meth:`IToken.from_bytes <btns_vici.core.tokens.IToken.from_bytes>` wrap it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from .attributes import ITOKEN_RULES, SPEC, Scalar, check_scalar, to_wire
from .constants import Attr, Setting
from .errors import SerializationError, TokenAttributeError

MAGIC = b"BTiT"
VERSION = 1
MAX_SERIALIZED = 32768
_HEAD = struct.Struct(">4sBB")
_REC = struct.Struct(">HH")
_ITOKEN_IDS = frozenset(int(a) for a in ITOKEN_RULES.allowed)


def _is_default(attr: Attr, value: object) -> bool:
    """An attribute at its table default (the switches' ANY) is not encoded."""
    default = ITOKEN_RULES.defaults.get(attr)
    return default is not None and value == default


def encode_itoken(attributes: Mapping[Attr, Scalar]) -> bytes:
    """The canonical form of an iToken's (validated) attributes."""
    records = []
    for attr in sorted(attributes):
        value = attributes[attr]
        if _is_default(attr, value):
            continue
        raw = to_wire(SPEC[attr], value)
        records.append(_REC.pack(attr, len(raw)) + raw)
    return _HEAD.pack(MAGIC, VERSION, len(records)) + b"".join(records)


def decode_itoken(data: bytes) -> dict[Attr, Scalar]:
    """The attributes of a serialized iToken; SerializationError (EINVAL) for anything not canonical."""
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
    attributes: dict[Attr, Scalar] = {}
    pos, last = _HEAD.size, 0
    for _ in range(count):
        if pos + _REC.size > len(data):
            raise SerializationError("serialized iToken truncated (record header)")
        attr_id, length = _REC.unpack_from(data, pos)
        pos += _REC.size
        if attr_id <= last:
            raise SerializationError("records out of order or repeated")
        last = attr_id
        if attr_id not in _ITOKEN_IDS:
            raise SerializationError(f"unknown iToken attribute {attr_id}")
        attr = Attr(attr_id)
        spec = SPEC[attr]
        raw = data[pos : pos + length]
        if len(raw) != length:
            raise SerializationError("serialized iToken truncated (value)")
        pos += length
        try:
            fixed = spec.codec.wire_struct
            if fixed is not None:
                if length != fixed.size:
                    raise SerializationError(f"{attr.name}: integer of length {length}")
                number: int = fixed.unpack(raw)[0]
                if _is_default(attr, number):
                    raise SerializationError(f"{attr.name}: {Setting(number).name} is the default and is not encoded")
                value: object = number
            elif spec.codec.form == "string":
                value = raw.decode("utf-8")
            else:
                value = raw
            attributes[attr] = check_scalar(spec, value)
        except UnicodeDecodeError:
            raise SerializationError(f"{attr.name}: not valid UTF-8") from None
        except TokenAttributeError as exc:
            raise SerializationError(f"invalid value: {exc.strerror}") from None
    if pos != len(data):
        raise SerializationError("trailing bytes after serialized iToken")
    return attributes


__all__ = ["MAGIC", "MAX_SERIALIZED", "VERSION", "decode_itoken", "encode_itoken"]
