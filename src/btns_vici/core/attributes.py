"""The attribute table: every rule about a token attribute, in one place. Pure.

One row per :class:`~btns_vici.core.constants.Attr` says which token kinds carry the
attribute, the C enum the draft puts it in (figures 4 and 8), its value type and codec,
whether an application may set it (``ipsec_set_token_attr``; otherwise EPERM), its
initial value, and whether the equivalence rules compare it (README "Equivalence").
Everything else is derived from :data:`TABLE`: the tokens' allowed, settable and
default attributes, the C form of ``ipsec_get_token_attr``/``ipsec_set_token_attr``
(2-octet integers in host byte order, NUL-terminated strings, draft section 2), the
wire form of serialized iTokens (big-endian integers, strings without NUL), the
``capi`` constants, and README's "Constant values" table (a test checks they agree,
and agree with ``cabi/ipsec_api.h``).

The object-valued pToken attributes (``iToken``, ``remote_iToken``) are typed here;
their codec is the serialized iToken of :mod:`.serialize`, applied by :mod:`.tokens`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .constants import Attr, AuthMethod, Setting
from .errors import TokenAttributeError

#: Limits keep every token bounded in memory.
MAX_STRING_LEN = 4096  # bytes, including the terminating NUL
MAX_BINARY_LEN = 16384  # a DER SubjectPublicKeyInfo of an RSA-16384 key fits

#: A decoded value that is not a token: what the C and wire codecs handle directly.
Scalar = int | str | bytes


class Kind(enum.Flag):
    """Token kinds: an attribute row names the kinds that carry it, and those that may set it."""

    NONE = 0
    ITOKEN = enum.auto()
    PTOKEN = enum.auto()
    BOTH = ITOKEN | PTOKEN


@dataclass(frozen=True, eq=False)
class Codec:
    """A value type: what Python holds, how the C form and the wire form encode it."""

    #: The README's "type" column (and the C header's comment).
    name: str
    form: Literal["uint16", "string", "binary", "itoken"]
    #: The values a uint16 may take (None: not an integer).
    values: frozenset[int] | None = None
    #: Fixed-size C form, host byte order (draft section 2); None: variable length.
    c_struct: struct.Struct | None = None
    #: Fixed-size wire form of serialized iTokens, big-endian; None: variable length.
    wire_struct: struct.Struct | None = None


_U16_C = struct.Struct("=H")
_U16_WIRE = struct.Struct(">H")

METHOD = Codec("uint16 (an `authMeth_*` value)", "uint16", frozenset(AuthMethod), _U16_C, _U16_WIRE)
SWITCH = Codec("uint16 switch", "uint16", frozenset({Setting.DISABLE, Setting.ENABLE, Setting.ANY}), _U16_C, _U16_WIRE)
LEVEL = Codec("uint16 level", "uint16", frozenset(Setting), _U16_C, _U16_WIRE)
STRING = Codec("string", "string")
BINARY = Codec("binary: DER SubjectPublicKeyInfo", "binary")
SERIALIZED_ITOKEN = Codec("serialized iToken", "itoken")

#: The C enums of ``ipsec_api.h`` (figure 4 splits the iToken's in two; figure 8).
ENUM_ITOKEN = "ipsec_iToken_attribute"
ENUM_AUTH_METH = "ipsec_iToken_auth_meth"
ENUM_PTOKEN = "ipsec_pToken_attribute"
#: The enum of the switch and level values (used but not defined by the draft).
ENUM_VALUES = "ipsec_api_attr_value"


@dataclass(frozen=True)
class AttrSpec:
    """Everything about one attribute."""

    attr: Attr
    #: The C enum the header declares it in.
    enum: str
    #: The token kinds that carry it.
    kinds: Kind
    codec: Codec
    #: The kinds on which an application may set it (elsewhere: EPERM).
    settable: Kind
    #: Its value in a fresh token (ipsec_create_*Token), None: no value.
    default: Setting | None
    #: Whether equivalence compares it (identity of an iToken, section 2.3.5 for a pToken).
    compared: bool


def _switch(method: AuthMethod) -> AttrSpec:
    return AttrSpec(Attr(method), ENUM_AUTH_METH, Kind.ITOKEN, SWITCH, Kind.ITOKEN, Setting.ANY, True)


_I, _P, _B, _N = Kind.ITOKEN, Kind.PTOKEN, Kind.BOTH, Kind.NONE

#: The one table, in attribute order.
TABLE: tuple[AttrSpec, ...] = (
    # Descriptive only: never compared; on a pToken the application's, on an iToken the library's.
    AttrSpec(Attr.auditString, ENUM_ITOKEN, _B, STRING, _P, None, False),
    # Figure 4: the identity, read-only.
    AttrSpec(Attr.authenticationMethod, ENUM_ITOKEN, _I, METHOD, _N, None, True),
    AttrSpec(Attr.certificateAuthorityDN, ENUM_ITOKEN, _I, STRING, _N, None, True),
    AttrSpec(Attr.certificateDN, ENUM_ITOKEN, _I, STRING, _N, None, True),
    AttrSpec(Attr.pubKeyID, ENUM_ITOKEN, _I, BINARY, _N, None, True),
    AttrSpec(Attr.channelBinding, ENUM_ITOKEN, _I, STRING, _N, None, True),
    # Figure 4: the authentication-method switches, writable, ANY until set.
    *(_switch(m) for m in AuthMethod),
    # Figure 8.
    AttrSpec(Attr.privacyProtected, ENUM_PTOKEN, _P, LEVEL, _P, Setting.ANY, True),
    AttrSpec(Attr.integrityProtected, ENUM_PTOKEN, _P, LEVEL, _P, Setting.ANY, True),
    AttrSpec(Attr.compressionAvailable, ENUM_PTOKEN, _P, SWITCH, _P, Setting.ANY, True),
    AttrSpec(Attr.policyName, ENUM_PTOKEN, _P, STRING, _P, None, False),
    AttrSpec(Attr.iToken, ENUM_PTOKEN, _P, SERIALIZED_ITOKEN, _P, None, True),
    AttrSpec(Attr.remote_iToken, ENUM_PTOKEN, _P, SERIALIZED_ITOKEN, _P, None, True),
    AttrSpec(Attr.tunnelMode, ENUM_PTOKEN, _P, SWITCH, _P, Setting.ANY, True),
    AttrSpec(Attr.ipoptionsProtected, ENUM_PTOKEN, _P, SWITCH, _P, Setting.ANY, True),
    # Written only by the library, from a verified SA.
    AttrSpec(Attr.informationString, ENUM_PTOKEN, _P, STRING, _N, None, False),
)

SPEC: Mapping[Attr, AttrSpec] = {row.attr: row for row in TABLE}
if set(SPEC) != set(Attr) or len(SPEC) != len(TABLE):  # pragma: no cover - the table is complete
    raise ImportError("the attribute table must have exactly one row per Attr")


@dataclass(frozen=True)
class Rules:
    """What one token kind allows, derived from :data:`TABLE`."""

    kind: Kind
    name: str
    allowed: frozenset[Attr]
    settable: frozenset[Attr]
    defaults: Mapping[Attr, int]
    #: Compared by equivalence, in attribute order.
    compared: tuple[Attr, ...]


def _rules(kind: Kind, name: str) -> Rules:
    rows = [r for r in TABLE if kind in r.kinds]
    return Rules(
        kind=kind,
        name=name,
        allowed=frozenset(r.attr for r in rows),
        settable=frozenset(r.attr for r in rows if kind in r.settable),
        defaults={r.attr: int(r.default) for r in rows if r.default is not None},
        compared=tuple(r.attr for r in rows if r.compared),
    )


ITOKEN_RULES = _rules(Kind.ITOKEN, "iToken")
PTOKEN_RULES = _rules(Kind.PTOKEN, "pToken")

#: The iToken attributes that name an identity (compared, figure 4's identity enum).
IDENTITY_ATTRS = tuple(r.attr for r in TABLE if r.enum == ENUM_ITOKEN and r.compared)
#: The iToken's authentication-method switches.
AUTH_SWITCHES = tuple(r.attr for r in TABLE if r.enum == ENUM_AUTH_METH)
#: The pToken's protection levels and switches (what a demand asks for, what a read pToken reports).
LEVEL_ATTRS = tuple(r.attr for r in TABLE if Kind.PTOKEN in r.kinds and r.codec is LEVEL)
SWITCH_ATTRS = tuple(r.attr for r in TABLE if Kind.PTOKEN in r.kinds and r.codec is SWITCH)
#: Every attribute whose value is a :class:`Setting` (levels and switches, of both kinds).
SETTING_ATTRS = frozenset(r.attr for r in TABLE if r.codec is LEVEL or r.codec is SWITCH)
#: The pToken attributes holding an iToken.
OBJECT_ATTRS = tuple(r.attr for r in TABLE if r.codec is SERIALIZED_ITOKEN)


# -- the values: validation, the C form, the wire form ---------------------------------------


def check_scalar(spec: AttrSpec, value: object) -> Scalar:
    """``value`` validated for ``spec`` (an int for integers); EINVAL otherwise."""
    attr, codec = spec.attr, spec.codec
    if codec.values is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenAttributeError(f"{attr.name} takes an integer")
        if value not in codec.values:
            raise TokenAttributeError(f"{value} is not a valid value for {attr.name}")
        return int(value)
    if codec.form == "string":
        if not isinstance(value, str):
            raise TokenAttributeError(f"{attr.name} takes a string")
        if "\0" in value or len(value.encode("utf-8", "surrogatepass")) + 1 > MAX_STRING_LEN:
            raise TokenAttributeError(f"{attr.name}: embedded NUL or longer than {MAX_STRING_LEN - 1} bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenAttributeError(f"{attr.name}: not encodable as UTF-8") from None
        return value
    if codec.form == "binary":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TokenAttributeError(f"{attr.name} takes bytes")
        raw = bytes(value)
        if not 0 < len(raw) <= MAX_BINARY_LEN:
            raise TokenAttributeError(f"{attr.name}: length must be 1..{MAX_BINARY_LEN}")
        return raw
    raise TokenAttributeError(f"attribute {attr.name} holds a {codec.name}")


def to_c(spec: AttrSpec, value: Scalar) -> bytes:
    """The C form of a validated value (what ipsec_get_token_attr writes)."""
    if isinstance(value, int):
        assert spec.codec.c_struct is not None
        return spec.codec.c_struct.pack(value)
    if isinstance(value, str):
        return value.encode("utf-8") + b"\0"
    return value


def from_c(spec: AttrSpec, raw: bytes) -> Scalar:
    """Decode and validate the C form (what ipsec_set_token_attr reads)."""
    attr, codec = spec.attr, spec.codec
    if codec.c_struct is not None:
        if len(raw) != codec.c_struct.size:
            raise TokenAttributeError(f"{attr.name}: attr_len must be {codec.c_struct.size}, got {len(raw)}")
        return check_scalar(spec, codec.c_struct.unpack(raw)[0])
    if codec.form == "string":
        if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
            raise TokenAttributeError(f"{attr.name}: must be one NUL-terminated string")
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise TokenAttributeError(f"{attr.name}: not valid UTF-8") from None
        return check_scalar(spec, text)
    return check_scalar(spec, raw)


def to_wire(spec: AttrSpec, value: Scalar) -> bytes:
    """The wire form of a validated value (a serialized iToken's record)."""
    if isinstance(value, int):
        assert spec.codec.wire_struct is not None
        return spec.codec.wire_struct.pack(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def capi_constants() -> dict[str, int]:
    """The ``IPSEC_API_ATTR_*`` names of ``btns_vici.capi`` and ``ipsec_api.h`` with their values."""
    names = {f"IPSEC_API_ATTR_{a.name}": int(a) for a in Attr}
    # As printed in figure 4 (a typo of LEAPOFFAITH); both spellings are the same value.
    names["IPSEC_API_ATTR_authMeth_LEAPOFFFAITH"] = int(Attr.authMeth_LEAPOFFAITH)
    names.update({f"IPSEC_API_ATTR_{s.name}": int(s) for s in Setting})
    return names


__all__ = [
    "AUTH_SWITCHES",
    "BINARY",
    "IDENTITY_ATTRS",
    "ITOKEN_RULES",
    "LEVEL",
    "LEVEL_ATTRS",
    "MAX_BINARY_LEN",
    "MAX_STRING_LEN",
    "METHOD",
    "OBJECT_ATTRS",
    "PTOKEN_RULES",
    "SERIALIZED_ITOKEN",
    "SETTING_ATTRS",
    "SPEC",
    "STRING",
    "SWITCH",
    "SWITCH_ATTRS",
    "TABLE",
    "AttrSpec",
    "Codec",
    "Kind",
    "Rules",
    "Scalar",
    "capi_constants",
    "check_scalar",
    "from_c",
    "to_c",
    "to_wire",
]
