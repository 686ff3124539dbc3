"""iTokens and pTokens (draft sections 2.1-2.3): attributes, equivalence, duplication. Pure.

The same objects are returned by :mod:`btns_vici.capi` and used by the pythonic API.
Attribute values are kept decoded (int, str, bytes, IToken); the C encodings
(2-octet host-order integers, NUL-terminated strings) are applied in
:func:`encode_attr` / :func:`decode_attr`.
"""

from __future__ import annotations

import struct
from typing import Union

from .constants import (
    BINARY_ATTRS,
    ITOKEN_ATTRS,
    ITOKEN_AUTH_SWITCHES,
    ITOKEN_READONLY,
    MAX_BINARY_LEN,
    MAX_STRING_LEN,
    PTOKEN_ATTRS,
    PTOKEN_LEVEL_ATTRS,
    PTOKEN_OBJECT_ATTRS,
    PTOKEN_READONLY,
    STRING_ATTRS,
    UINT16_ATTRS,
    Attr,
    AuthMethod,
    Setting,
)
from .errors import NoValueError, ReadOnlyAttributeError, TokenAttributeError, TokenFreedError
from .selectors import TrafficSelector

Value = Union[int, str, bytes, "IToken"]
_U16 = struct.Struct("=H")  # host byte order, as the draft says (section 2)

SWITCH_VALUES = frozenset({Setting.DISABLE, Setting.ENABLE, Setting.ANY})
LEVEL_VALUES = frozenset(Setting)

#: iToken attributes that decide equivalence (auditString is descriptive only).
_ITOKEN_IDENTITY_KEYS = (
    Attr.authenticationMethod,
    Attr.certificateAuthorityDN,
    Attr.certificateDN,
    Attr.pubKeyID,
    Attr.channelBinding,
)
#: pToken attributes that decide equivalence (section 2.3.5); names and strings do not.
_PTOKEN_CRYPTO_KEYS = (
    Attr.privacyProtected,
    Attr.integrityProtected,
    Attr.compressionAvailable,
    Attr.tunnelMode,
    Attr.ipoptionsProtected,
)


def _attr(attr_type: int, allowed: frozenset[Attr], kind: str) -> Attr:
    try:
        attr = Attr(attr_type)
    except ValueError:
        raise TokenAttributeError(f"unknown attribute type {attr_type!r}") from None
    if attr not in allowed:
        raise TokenAttributeError(f"attribute {attr.name} ({int(attr)}) is not an {kind} attribute")
    return attr


def _check_value(attr: Attr, value: object) -> Value:
    """Validate a decoded value for ``attr``; raise EINVAL otherwise."""
    if attr in UINT16_ATTRS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenAttributeError(f"{attr.name} takes an integer")
        if attr == Attr.authenticationMethod:
            allowed: frozenset[int] = frozenset(AuthMethod)
        elif attr in PTOKEN_LEVEL_ATTRS:
            allowed = LEVEL_VALUES
        else:
            allowed = SWITCH_VALUES
        if value not in allowed:
            raise TokenAttributeError(f"{value} is not a valid value for {attr.name}")
        return int(value)
    if attr in STRING_ATTRS:
        if not isinstance(value, str):
            raise TokenAttributeError(f"{attr.name} takes a string")
        if "\0" in value or len(value.encode("utf-8", "surrogatepass")) + 1 > MAX_STRING_LEN:
            raise TokenAttributeError(f"{attr.name}: embedded NUL or longer than {MAX_STRING_LEN - 1} bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenAttributeError(f"{attr.name}: not encodable as UTF-8") from None
        return value
    if attr in BINARY_ATTRS:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TokenAttributeError(f"{attr.name} takes bytes")
        value = bytes(value)
        if not 0 < len(value) <= MAX_BINARY_LEN:
            raise TokenAttributeError(f"{attr.name}: length must be 1..{MAX_BINARY_LEN}")
        return value
    if attr in PTOKEN_OBJECT_ATTRS:
        if not isinstance(value, IToken):
            raise TokenAttributeError(f"{attr.name} takes an iToken")
        value._check_live()
        return value.copy()
    raise TokenAttributeError(f"attribute {attr.name} has no value type")  # pragma: no cover


def encode_attr(attr: Attr, value: Value) -> bytes:
    """The C encoding of a decoded value (what ipsec_get_token_attr writes)."""
    if attr in UINT16_ATTRS:
        assert isinstance(value, int)
        return _U16.pack(value)
    if attr in STRING_ATTRS:
        assert isinstance(value, str)
        return value.encode("utf-8") + b"\0"
    if attr in PTOKEN_OBJECT_ATTRS:
        assert isinstance(value, IToken)
        return value.to_bytes()
    assert isinstance(value, bytes)
    return value


def decode_attr(attr: Attr, raw: bytes) -> Value:
    """Decode and validate the C encoding of ``attr`` (what ipsec_set_token_attr reads)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TokenAttributeError(f"{attr.name}: attr_val must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    if attr in UINT16_ATTRS:
        if len(raw) != _U16.size:
            raise TokenAttributeError(f"{attr.name}: attr_len must be 2, got {len(raw)}")
        return _check_value(attr, _U16.unpack(raw)[0])
    if attr in STRING_ATTRS:
        if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
            raise TokenAttributeError(f"{attr.name}: must be one NUL-terminated string")
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise TokenAttributeError(f"{attr.name}: not valid UTF-8") from None
        return _check_value(attr, text)
    if attr in PTOKEN_OBJECT_ATTRS:
        from .serialize import itoken_from_bytes

        return itoken_from_bytes(raw)
    return _check_value(attr, raw)


class _Token:
    """Common storage: a dict of decoded attribute values, and the freed flag."""

    _kind = "token"
    _allowed: frozenset[Attr] = frozenset()
    _readonly: frozenset[Attr] = frozenset()
    _defaults: dict[Attr, Value] = {}

    def __init__(self) -> None:
        self._attrs: dict[Attr, Value] = dict(self._defaults)
        self._freed = False

    # -- lifecycle -------------------------------------------------------
    def _check_live(self) -> None:
        if self._freed:
            raise TokenFreedError(f"this {self._kind} has been freed")

    def free(self) -> None:
        """Free the token (ipsec_free_*Token); any later use raises EBADF."""
        self._check_live()
        self._freed = True
        self._attrs.clear()

    @property
    def freed(self) -> bool:
        return self._freed

    # -- attribute access (section 2.2) ----------------------------------
    def get_attr(self, attr_type: int) -> Value:
        """The decoded value of an attribute; NoValueError (ENODATA) when it has none."""
        self._check_live()
        attr = _attr(attr_type, self._allowed, self._kind)
        try:
            return self._attrs[attr]
        except KeyError:
            raise NoValueError(f"{self._kind} attribute {attr.name} has no value") from None

    def set_attr(self, attr_type: int, value: object) -> None:
        """Set a writable attribute from a decoded value (EINVAL, EPERM as documented)."""
        self._check_live()
        attr = _attr(attr_type, self._allowed, self._kind)
        if attr in self._readonly:
            raise ReadOnlyAttributeError(f"{self._kind} attribute {attr.name} cannot be modified")
        self._attrs[attr] = _check_value(attr, value)

    def get_attr_bytes(self, attr_type: int) -> bytes:
        """ipsec_get_token_attr: the attribute in the draft's C encoding."""
        value = self.get_attr(attr_type)
        return encode_attr(Attr(attr_type), value)

    def set_attr_bytes(self, attr_type: int, raw: bytes) -> None:
        """ipsec_set_token_attr: set from the draft's C encoding."""
        self._check_live()
        attr = _attr(attr_type, self._allowed, self._kind)
        if attr in self._readonly:
            raise ReadOnlyAttributeError(f"{self._kind} attribute {attr.name} cannot be modified")
        self._attrs[attr] = decode_attr(attr, raw)

    def _set_internal(self, attr: Attr, value: object) -> None:
        """Set any attribute, read-only ones included: for the library's own derivation code."""
        self._check_live()
        self._attrs[attr] = _check_value(attr, value)

    def _opt(self, attr: Attr) -> Value | None:
        self._check_live()
        return self._attrs.get(attr)

    def attributes(self) -> dict[Attr, Value]:
        """A snapshot of every attribute that has a value."""
        self._check_live()
        return dict(self._attrs)


class IToken(_Token):
    """Identity token (draft 2.1): the identity of one end, serializable.

    The identity attributes are read-only for applications; the
    authentication-method switches (``authMeth_*``) are writable and default to ANY.
    """

    _kind = "iToken"
    _allowed = ITOKEN_ATTRS
    _readonly = ITOKEN_READONLY
    _defaults = {a: int(Setting.ANY) for a in ITOKEN_AUTH_SWITCHES}

    @classmethod
    def from_identity(
        cls,
        *,
        authentication_method: AuthMethod,
        pub_key_id: bytes | None = None,
        certificate_dn: str | None = None,
        certificate_authority_dn: str | None = None,
        channel_binding: str | None = None,
        audit_string: str | None = None,
    ) -> IToken:
        """Build an identity iToken (used by backends, and to pin a known peer key)."""
        tok = cls()
        tok._set_internal(Attr.authenticationMethod, int(authentication_method))
        for attr, val in (
            (Attr.pubKeyID, pub_key_id),
            (Attr.certificateDN, certificate_dn),
            (Attr.certificateAuthorityDN, certificate_authority_dn),
            (Attr.channelBinding, channel_binding),
            (Attr.auditString, audit_string),
        ):
            if val is not None:
                tok._set_internal(attr, val)
        for method in AuthMethod:
            used = method == authentication_method
            tok._set_internal(Attr(method), int(Setting.ENABLE if used else Setting.DISABLE))
        return tok

    # -- typed properties --------------------------------------------------
    @property
    def audit_string(self) -> str | None:
        return self._opt(Attr.auditString)  # type: ignore[return-value]

    @property
    def authentication_method(self) -> AuthMethod | None:
        v = self._opt(Attr.authenticationMethod)
        return None if v is None else AuthMethod(v)  # type: ignore[arg-type]

    @property
    def certificate_authority_dn(self) -> str | None:
        return self._opt(Attr.certificateAuthorityDN)  # type: ignore[return-value]

    @property
    def certificate_dn(self) -> str | None:
        return self._opt(Attr.certificateDN)  # type: ignore[return-value]

    @property
    def pub_key_id(self) -> bytes | None:
        return self._opt(Attr.pubKeyID)  # type: ignore[return-value]

    @property
    def channel_binding(self) -> str | None:
        return self._opt(Attr.channelBinding)  # type: ignore[return-value]

    @property
    def has_identity(self) -> bool:
        """True when this iToken names an identity (not only auth-method switches)."""
        self._check_live()
        return any(a in self._attrs for a in _ITOKEN_IDENTITY_KEYS)

    def auth_method(self, method: AuthMethod) -> Setting:
        """The ENABLE/DISABLE/ANY switch of one authentication method."""
        return Setting(self.get_attr(Attr(method)))  # type: ignore[arg-type]

    def set_auth_method(self, method: AuthMethod, setting: Setting) -> None:
        self.set_attr(Attr(AuthMethod(method)), setting)

    # -- serialization, copying, equivalence -------------------------------
    def to_bytes(self) -> bytes:
        """The canonical serialized form (draft 2: "the iToken is a serializable token")."""
        from .serialize import itoken_to_bytes

        return itoken_to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> IToken:
        from .serialize import itoken_from_bytes

        return itoken_from_bytes(data)

    def copy(self) -> IToken:
        self._check_live()
        new = IToken()
        new._attrs = dict(self._attrs)
        return new

    def identity_key(self) -> tuple[object, ...]:
        """What two equivalent identities share: method, key, certificate, CA, binding."""
        self._check_live()
        return tuple(self._attrs.get(a) for a in _ITOKEN_IDENTITY_KEYS)

    def equivalent(self, other: IToken) -> bool:
        """Same identity and same authentication-method switches (auditString ignored)."""
        self._check_live()
        other._check_live()
        return self.identity_key() == other.identity_key() and all(
            self._attrs.get(Attr(m)) == other._attrs.get(Attr(m)) for m in AuthMethod
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IToken):
            return NotImplemented
        return self.equivalent(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        if self._freed:
            return "<IToken freed>"
        m = self.authentication_method
        return f"<IToken {m.name if m else 'template'} {self.audit_string or ''}>".replace(" >", ">")


class PToken(_Token):
    """Protection token (draft 2.3): a socket's protection, or the protection it demands.

    Besides the draft's attributes a pToken read from a connection records the
    SPD ranges (traffic selectors) its SA covers; section 2.3.5 compares them.
    """

    _kind = "pToken"
    _allowed = PTOKEN_ATTRS
    _readonly = PTOKEN_READONLY
    _defaults = {
        Attr.privacyProtected: int(Setting.ANY),
        Attr.integrityProtected: int(Setting.ANY),
        Attr.compressionAvailable: int(Setting.ANY),
        Attr.tunnelMode: int(Setting.ANY),
        Attr.ipoptionsProtected: int(Setting.ANY),
    }

    def __init__(self) -> None:
        super().__init__()
        self.local_ts: tuple[TrafficSelector, ...] = ()
        self.remote_ts: tuple[TrafficSelector, ...] = ()

    def free(self) -> None:
        super().free()
        self.local_ts = self.remote_ts = ()

    # -- typed properties --------------------------------------------------
    def _setting(self, attr: Attr) -> Setting:
        return Setting(self.get_attr(attr))  # type: ignore[arg-type]

    @property
    def privacy_protected(self) -> Setting:
        return self._setting(Attr.privacyProtected)

    @privacy_protected.setter
    def privacy_protected(self, value: Setting) -> None:
        self.set_attr(Attr.privacyProtected, value)

    @property
    def integrity_protected(self) -> Setting:
        return self._setting(Attr.integrityProtected)

    @integrity_protected.setter
    def integrity_protected(self, value: Setting) -> None:
        self.set_attr(Attr.integrityProtected, value)

    @property
    def compression_available(self) -> Setting:
        return self._setting(Attr.compressionAvailable)

    @compression_available.setter
    def compression_available(self, value: Setting) -> None:
        self.set_attr(Attr.compressionAvailable, value)

    @property
    def tunnel_mode(self) -> Setting:
        return self._setting(Attr.tunnelMode)

    @tunnel_mode.setter
    def tunnel_mode(self, value: Setting) -> None:
        self.set_attr(Attr.tunnelMode, value)

    @property
    def ipoptions_protected(self) -> Setting:
        return self._setting(Attr.ipoptionsProtected)

    @ipoptions_protected.setter
    def ipoptions_protected(self, value: Setting) -> None:
        self.set_attr(Attr.ipoptionsProtected, value)

    @property
    def policy_name(self) -> str | None:
        return self._opt(Attr.policyName)  # type: ignore[return-value]

    @policy_name.setter
    def policy_name(self, value: str) -> None:
        self.set_attr(Attr.policyName, value)

    @property
    def audit_string(self) -> str | None:
        return self._opt(Attr.auditString)  # type: ignore[return-value]

    @audit_string.setter
    def audit_string(self, value: str) -> None:
        self.set_attr(Attr.auditString, value)

    @property
    def information_string(self) -> str | None:
        return self._opt(Attr.informationString)  # type: ignore[return-value]

    @property
    def itoken(self) -> IToken | None:
        """The remote system's identity (draft: attribute ``iToken``)."""
        return self._opt(Attr.iToken)  # type: ignore[return-value]

    @itoken.setter
    def itoken(self, value: IToken) -> None:
        self.set_attr(Attr.iToken, value)

    @property
    def remote_itoken(self) -> IToken | None:
        """The identity we showed the remote system (draft: attribute ``remote_iToken``)."""
        return self._opt(Attr.remote_iToken)  # type: ignore[return-value]

    @remote_itoken.setter
    def remote_itoken(self, value: IToken) -> None:
        self.set_attr(Attr.remote_iToken, value)

    @property
    def protected(self) -> bool:
        """True for a pToken read from a connection whose SA was verified to protect it.

        A template (a pToken the application filled in) is never "protected".
        """
        self._check_live()
        levels = (Setting.LEVEL_LOW, Setting.LEVEL_MEDIUM, Setting.LEVEL_HIGH)
        return Attr.informationString in self._attrs and any(
            self._attrs.get(a) in levels for a in (Attr.privacyProtected, Attr.integrityProtected)
        )

    # -- copying and equivalence -------------------------------------------
    def copy(self) -> PToken:
        """ipsec_dup_pToken (draft 2.3.6): a deep copy."""
        self._check_live()
        new = PToken()
        new._attrs = {k: (v.copy() if isinstance(v, IToken) else v) for k, v in self._attrs.items()}
        new.local_ts, new.remote_ts = self.local_ts, self.remote_ts
        return new

    def equivalence_key(self) -> tuple[object, ...]:
        """Everything section 2.3.5 compares, nothing it says to ignore (see README)."""
        self._check_live()
        idents = []
        for a in (Attr.iToken, Attr.remote_iToken):
            tok = self._attrs.get(a)
            idents.append(
                None if tok is None else (tok.identity_key(), tuple(tok._attrs.get(Attr(m)) for m in AuthMethod))  # type: ignore[union-attr]
            )
        return (
            tuple(self._attrs.get(a) for a in _PTOKEN_CRYPTO_KEYS),
            tuple(idents),
            frozenset(self.local_ts),
            frozenset(self.remote_ts),
        )

    def equivalent(self, other: PToken) -> bool:
        other._check_live()
        return self.equivalence_key() == other.equivalence_key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PToken):
            return NotImplemented
        return self.equivalent(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        if self._freed:
            return "<PToken freed>"
        p, i = self._attrs.get(Attr.privacyProtected), self._attrs.get(Attr.integrityProtected)
        return f"<PToken privacy={Setting(p).name} integrity={Setting(i).name}>"  # type: ignore[arg-type]
