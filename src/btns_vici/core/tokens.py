"""iTokens and pTokens (draft sections 2.1-2.3): attributes, equivalence, duplication. Pure.

The same objects are returned by :mod:`btns_vici.capi` and used by the pythonic API.
Attribute values are kept decoded (int, str, bytes, IToken); which attributes a kind
carries, which an application may set, their types, defaults and codecs are the rows of
:mod:`.attributes`. The C encodings (2-octet host-order integers, NUL-terminated strings,
serialized iTokens) are applied in :func:`encode_attr` / :func:`decode_attr`.

Construction: ``IToken()``/``PToken()`` is the application's template (ipsec_create_*Token);
``_from_attributes`` is the core's one privileged constructor (read-only attributes too), used
by :mod:`.derive` (whose :func:`~.derive.restored_ptoken` serves the edges) and the iToken parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Union

from . import serialize
from .attributes import (
    IDENTITY_ATTRS,
    ITOKEN_RULES,
    LEVEL_ATTRS,
    PTOKEN_RULES,
    SERIALIZED_ITOKEN,
    SETTING_ATTRS,
    SPEC,
    Rules,
    check_scalar,
    from_c,
    to_c,
)
from .constants import Attr, AuthMethod, Setting
from .errors import NoValueError, ReadOnlyAttributeError, SerializationError, TokenAttributeError, TokenFreedError
from .selectors import TrafficSelector

Value = Union[int, str, bytes, "IToken"]


#: Attribute id -> Attr: a dict lookup is several times cheaper than calling the enum.
_BY_ID: dict[object, Attr] = {int(a): a for a in Attr}


def _attr(attr_type: int, rules: Rules) -> Attr:
    try:
        attr = _BY_ID.get(attr_type)
    except TypeError:  # unhashable
        attr = None
    if attr is None:
        raise TokenAttributeError(f"unknown attribute type {attr_type!r}")
    if attr not in rules.allowed:
        raise TokenAttributeError(f"attribute {attr.name} ({int(attr)}) is not an {rules.name} attribute")
    return attr


def _check_value(attr: Attr, value: object) -> Value:
    """Validate a decoded value for ``attr`` (the attribute table's type); raise EINVAL otherwise."""
    spec = SPEC[attr]
    if spec.codec is SERIALIZED_ITOKEN:
        if not isinstance(value, IToken):
            raise TokenAttributeError(f"{attr.name} takes an iToken")
        return value.copy()
    return check_scalar(spec, value)


def encode_attr(attr: Attr, value: Value) -> bytes:
    """The C encoding of a decoded value (what ipsec_get_token_attr writes)."""
    if isinstance(value, IToken):
        return value.to_bytes()
    return to_c(SPEC[attr], value)


def decode_attr(attr: Attr, raw: bytes) -> Value:
    """Decode and validate the C encoding of ``attr`` (what ipsec_set_token_attr reads)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TokenAttributeError(f"{attr.name}: attr_val must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    spec = SPEC[attr]
    if spec.codec is SERIALIZED_ITOKEN:
        return IToken.from_bytes(raw)
    return from_c(spec, raw)


class _Token:
    """Common storage: a dict of decoded attribute values, and the freed flag.

    ``Token()`` is the application's empty template (ipsec_create_*Token): the table's
    defaults, nothing else. :meth:`_from_attributes` is the core's privileged constructor.
    """

    _rules: ClassVar[Rules]

    def __init__(self) -> None:
        self._attrs: dict[Attr, Value] = dict(self._rules.defaults)
        self._freed = False

    def _fill(self, attributes: Mapping[Attr, object]) -> None:
        """Set every attribute of ``attributes``, read-only ones included (validated)."""
        rules = self._rules
        for attr_type, value in attributes.items():
            attr = _attr(attr_type, rules)
            self._attrs[attr] = _check_value(attr, value)

    # -- lifecycle -------------------------------------------------------
    def check_live(self) -> None:
        """Raise TokenFreedError (EBADF) if this token has been freed."""
        if self._freed:
            raise TokenFreedError(f"this {self._rules.name} has been freed")

    def free(self) -> None:
        """Free the token (ipsec_free_*Token); any later use raises EBADF."""
        self.check_live()
        self._freed = True
        self._attrs.clear()

    @property
    def freed(self) -> bool:
        return self._freed

    # -- attribute access (section 2.2) ----------------------------------
    def get_attr(self, attr_type: int) -> Value:
        """The decoded value of an attribute; NoValueError (ENODATA) when it has none."""
        self.check_live()
        attr = _attr(attr_type, self._rules)
        try:
            return self._attrs[attr]
        except KeyError:
            raise NoValueError(f"{self._rules.name} attribute {attr.name} has no value") from None

    def _settable(self, attr_type: int) -> Attr:
        self.check_live()
        attr = _attr(attr_type, self._rules)
        if attr not in self._rules.settable:
            raise ReadOnlyAttributeError(f"{self._rules.name} attribute {attr.name} cannot be modified")
        return attr

    def set_attr(self, attr_type: int, value: object) -> None:
        """Set a writable attribute from a decoded value (EINVAL, EPERM as documented)."""
        attr = self._settable(attr_type)
        self._attrs[attr] = _check_value(attr, value)

    def get_attr_bytes(self, attr_type: int) -> bytes:
        """ipsec_get_token_attr: the attribute in the draft's C encoding."""
        value = self.get_attr(attr_type)
        return encode_attr(Attr(attr_type), value)

    def set_attr_bytes(self, attr_type: int, raw: bytes) -> None:
        """ipsec_set_token_attr: set from the draft's C encoding."""
        attr = self._settable(attr_type)
        self._attrs[attr] = decode_attr(attr, raw)

    def attributes(self) -> dict[Attr, Value]:
        """A snapshot of every attribute that has a value."""
        self.check_live()
        return dict(self._attrs)

    # -- typed reads (the attribute table fixes each attribute's type) ---
    def _opt(self, attr: Attr) -> Value | None:
        self.check_live()
        return self._attrs.get(attr)

    def _text(self, attr: Attr) -> str | None:
        value = self._opt(attr)
        return value if isinstance(value, str) else None

    def _setting(self, attr: Attr) -> Setting:
        """A level or switch: always present (the table's default is ANY)."""
        value = self.get_attr(attr)
        if not isinstance(value, int):  # pragma: no cover - the table types it
            raise NoValueError(f"{self._rules.name} attribute {attr.name} has no setting")
        return Setting(value)

    def setting(self, attr: Attr) -> Setting | None:
        """The level or switch ``attr`` holds; None when it has none or is not a level or switch."""
        value = self._opt(attr)
        return Setting(value) if isinstance(value, int) and attr in SETTING_ATTRS else None


class IToken(_Token):
    """Identity token (draft 2.1): the identity of one end, serializable.

    The identity attributes are read-only for applications; the
    authentication-method switches (``authMeth_*``) are writable and default to ANY.
    """

    _rules = ITOKEN_RULES

    @classmethod
    def _from_attributes(cls, attributes: Mapping[Attr, object]) -> IToken:
        """The privileged constructor, for the core only: any iToken attribute, validated."""
        tok = cls()
        tok._fill(attributes)
        return tok

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
        attributes: dict[Attr, object] = {Attr.authenticationMethod: int(authentication_method)}
        for attr, val in (
            (Attr.pubKeyID, pub_key_id),
            (Attr.certificateDN, certificate_dn),
            (Attr.certificateAuthorityDN, certificate_authority_dn),
            (Attr.channelBinding, channel_binding),
            (Attr.auditString, audit_string),
        ):
            if val is not None:
                attributes[attr] = val
        for method in AuthMethod:
            used = method == authentication_method
            attributes[Attr(method)] = int(Setting.ENABLE if used else Setting.DISABLE)
        return cls._from_attributes(attributes)

    # -- typed properties --------------------------------------------------
    @property
    def audit_string(self) -> str | None:
        return self._text(Attr.auditString)

    @property
    def authentication_method(self) -> AuthMethod | None:
        v = self._opt(Attr.authenticationMethod)
        return AuthMethod(v) if isinstance(v, int) else None

    @property
    def certificate_authority_dn(self) -> str | None:
        return self._text(Attr.certificateAuthorityDN)

    @property
    def certificate_dn(self) -> str | None:
        return self._text(Attr.certificateDN)

    @property
    def pub_key_id(self) -> bytes | None:
        v = self._opt(Attr.pubKeyID)
        return v if isinstance(v, bytes) else None

    @property
    def channel_binding(self) -> str | None:
        return self._text(Attr.channelBinding)

    @property
    def has_identity(self) -> bool:
        """True when this iToken names an identity (not only auth-method switches)."""
        self.check_live()
        return any(a in self._attrs for a in IDENTITY_ATTRS)

    def auth_method(self, method: AuthMethod) -> Setting:
        """The ENABLE/DISABLE/ANY switch of one authentication method."""
        return self._setting(Attr(method))

    def set_auth_method(self, method: AuthMethod, setting: Setting) -> None:
        self.set_attr(Attr(AuthMethod(method)), setting)

    # -- serialization, copying, equivalence -------------------------------
    def to_bytes(self) -> bytes:
        """The canonical serialized form (draft 2: "the iToken is a serializable token")."""
        self.check_live()
        return serialize.encode_itoken({a: v for a, v in self._attrs.items() if not isinstance(v, IToken)})

    @classmethod
    def from_bytes(cls, data: bytes) -> IToken:
        """Parse a serialized iToken; SerializationError (EINVAL) for anything not canonical."""
        try:
            return cls._from_attributes(serialize.decode_itoken(data))
        except TokenAttributeError as exc:  # pragma: no cover - decode_itoken validated every value
            raise SerializationError(f"invalid value: {exc.strerror}") from None

    def copy(self) -> IToken:
        self.check_live()
        new = IToken()
        new._attrs = dict(self._attrs)
        return new

    def identity_key(self) -> tuple[object, ...]:
        """What two equivalent identities share: method, key, certificate, CA, binding."""
        self.check_live()
        return tuple(self._attrs.get(a) for a in IDENTITY_ATTRS)

    def equivalence_key(self) -> tuple[object, ...]:
        """Everything equivalence compares (the table's compared iToken attributes; auditString is not)."""
        self.check_live()
        return tuple(self._attrs.get(a) for a in ITOKEN_RULES.compared)

    def equivalent(self, other: IToken) -> bool:
        """Same identity and same authentication-method switches (auditString ignored)."""
        other.check_live()
        return self.equivalence_key() == other.equivalence_key()

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

    _rules = PTOKEN_RULES

    def __init__(self) -> None:
        super().__init__()
        self.local_ts: tuple[TrafficSelector, ...] = ()
        self.remote_ts: tuple[TrafficSelector, ...] = ()

    @classmethod
    def _from_attributes(
        cls,
        attributes: Mapping[Attr, object],
        local_ts: Iterable[TrafficSelector] | None = None,
        remote_ts: Iterable[TrafficSelector] | None = None,
        *,
        base: PToken | None = None,
    ) -> PToken:
        """The privileged constructor, for the core only: any pToken attribute (informationString
        included), validated; iTokens are copied.

        With ``base`` the new token starts as a copy of it (selectors included) and ``attributes``
        only change it: the hot path of ``derive.ptoken_for`` validates two strings, not a template.
        """
        tok = cls() if base is None else base.copy()
        tok._fill(attributes)
        if local_ts is not None:
            tok.local_ts = tuple(local_ts)
        if remote_ts is not None:
            tok.remote_ts = tuple(remote_ts)
        return tok

    def free(self) -> None:
        super().free()
        self.local_ts = self.remote_ts = ()

    # -- typed properties --------------------------------------------------
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
        return self._text(Attr.policyName)

    @policy_name.setter
    def policy_name(self, value: str) -> None:
        self.set_attr(Attr.policyName, value)

    @property
    def audit_string(self) -> str | None:
        return self._text(Attr.auditString)

    @audit_string.setter
    def audit_string(self, value: str) -> None:
        self.set_attr(Attr.auditString, value)

    @property
    def information_string(self) -> str | None:
        return self._text(Attr.informationString)

    def identity(self, attr: Attr) -> IToken | None:
        """The iToken ``attr`` (``iToken`` or ``remote_iToken``) holds, None when it has none."""
        value = self._opt(attr)
        return value if isinstance(value, IToken) else None

    @property
    def itoken(self) -> IToken | None:
        """The remote system's identity (draft: attribute ``iToken``)."""
        return self.identity(Attr.iToken)

    @itoken.setter
    def itoken(self, value: IToken) -> None:
        self.set_attr(Attr.iToken, value)

    @property
    def remote_itoken(self) -> IToken | None:
        """The identity we showed the remote system (draft: attribute ``remote_iToken``)."""
        return self.identity(Attr.remote_iToken)

    @remote_itoken.setter
    def remote_itoken(self, value: IToken) -> None:
        self.set_attr(Attr.remote_iToken, value)

    @property
    def protected(self) -> bool:
        """True for a pToken read from a connection whose SA was verified to protect it.

        A template (a pToken the application filled in) is never "protected".
        """
        self.check_live()
        levels = (Setting.LEVEL_LOW, Setting.LEVEL_MEDIUM, Setting.LEVEL_HIGH)
        return Attr.informationString in self._attrs and any(self._attrs.get(a) in levels for a in LEVEL_ATTRS)

    # -- copying and equivalence -------------------------------------------
    def copy(self) -> PToken:
        """ipsec_dup_pToken (draft 2.3.6): a deep copy."""
        self.check_live()
        new = PToken()
        new._attrs = {k: (v.copy() if isinstance(v, IToken) else v) for k, v in self._attrs.items()}
        new.local_ts, new.remote_ts = self.local_ts, self.remote_ts
        return new

    def equivalence_key(self) -> tuple[object, ...]:
        """Everything section 2.3.5 compares, nothing it says to ignore (see README)."""
        self.check_live()
        values = []
        for a in PTOKEN_RULES.compared:
            v = self._attrs.get(a)
            values.append(v.equivalence_key() if isinstance(v, IToken) else v)
        return (tuple(values), frozenset(self.local_ts), frozenset(self.remote_ts))

    def equivalent(self, other: PToken) -> bool:
        other.check_live()
        return self.equivalence_key() == other.equivalence_key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PToken):
            return NotImplemented
        return self.equivalent(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        if self._freed:
            return "<PToken freed>"
        p, i = self.setting(Attr.privacyProtected), self.setting(Attr.integrityProtected)
        return f"<PToken privacy={p.name if p else None} integrity={i.name if i else None}>"


def fill(target: PToken, source: PToken) -> None:
    """Copy ``source`` into the caller-allocated ``target`` (the draft's get-into semantics)."""
    target.check_live()
    copy = source.copy()
    target._attrs = copy._attrs
    target.local_ts, target.remote_ts = copy.local_ts, copy.remote_ts


__all__ = ["IToken", "PToken", "Value", "decode_attr", "encode_attr", "fill"]
