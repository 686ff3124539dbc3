"""Does an actual protection satisfy a demanded one? Pure (used by send checks and latching).

A pToken used as a template (``ipsec_set_socket_pToken``, ``ipsec_set_msg_pToken``)
demands, per attribute (README: "Requirements"):

* ANY: the system default, no demand;
* DISABLE: the property must be absent (e.g. tunnelMode DISABLE = transport mode);
* ENABLE: present, at any level; LEVEL_LOW/MEDIUM/HIGH: present at that level or stronger.

Its iToken demands a peer identity (every identity attribute it carries must be
equal: peer pinning, section 2.1) and authentication methods: the actual
method's switch must not be DISABLE, and if any switch is ENABLE the actual
method must be one of the enabled ones. A raw-key (BTNS) peer whose key equals the
pinned pubKeyID also counts as LEAPOFFAITH.

Settings beyond the attribute values (README "Demand settings"):

* a pToken demanding nothing (every level and switch ANY, no constraining iToken,
  remote_iToken or policyName: :func:`is_no_demand`) is the system default: nothing is
  forced, no guard, no negotiation;
* ``policyName`` = :data:`USE_POLICY` (``"btns:use"``) is "use IPsec if the peer can,
  else clear" (KAME ``use``, OpenBSD ``IPSEC_LEVEL_USE``): an SA meeting the other
  attributes is attempted, a clear connection is accepted, and the pToken read
  afterwards says which it got;
* any other ``policyName`` (``conn`` or ``conn/child``) demands that operator
  connection: the connection's SA must come from it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .constants import Attr, AuthMethod, Setting
from .errors import NotSupportedError
from .tokens import IToken, PToken

_LEVELLED = (Attr.privacyProtected, Attr.integrityProtected)
_SWITCHES = (Attr.compressionAvailable, Attr.tunnelMode, Attr.ipoptionsProtected)
_IDENTITY = (
    Attr.pubKeyID,
    Attr.certificateDN,
    Attr.certificateAuthorityDN,
    Attr.channelBinding,
    Attr.authenticationMethod,
)


#: policyName value meaning "use IPsec if the peer can, else clear".
USE_POLICY = "btns:use"
#: policyName values starting with this are library keywords, never operator connections.
KEYWORD_PREFIX = "btns:"


def is_opportunistic(demand: PToken) -> bool:
    """True for a "use IPsec if the peer can, else clear" demand (policyName ``btns:use``)."""
    return demand.attributes().get(Attr.policyName) == USE_POLICY


def operator_policy(demand: PToken) -> tuple[str, str | None] | None:
    """The demanded operator connection (conn, child or None), from policyName ``conn[/child]``."""
    name = demand.attributes().get(Attr.policyName)
    if not isinstance(name, str) or not name or name.startswith(KEYWORD_PREFIX):
        return None
    conn, _, child = name.partition("/")
    return conn, (child or None)


def _itoken_constrains(tok: object) -> bool:
    if not isinstance(tok, IToken):
        return False
    attrs = tok.attributes()
    return any(a in attrs for a in _IDENTITY) or any(attrs.get(Attr(m), Setting.ANY) != Setting.ANY for m in AuthMethod)


def is_no_demand(demand: PToken) -> bool:
    """True when ``demand`` asks for nothing: the system default (nothing forced, no guard)."""
    want = demand.attributes()
    if any(want.get(a, Setting.ANY) != Setting.ANY for a in (*_LEVELLED, *_SWITCHES)):
        return False
    if Attr.policyName in want:
        return False
    return not (_itoken_constrains(want.get(Attr.iToken)) or _itoken_constrains(want.get(Attr.remote_iToken)))


def _int(value: object) -> int:
    """An integer attribute's value (a level, switch or method: tokens keep the kinds apart)."""
    if not isinstance(value, int):
        raise TypeError(f"not an integer attribute value: {type(value).__name__}")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _level_ok(demand: int, actual: int | None) -> bool:
    if demand == Setting.ANY:
        return True
    present = actual is not None and actual not in (Setting.DISABLE, Setting.ANY)
    if demand == Setting.DISABLE:
        return not present
    if not present:
        return False
    assert actual is not None
    # A read pToken reports ENABLE only for switches; levels are LEVEL_*.
    floor = Setting.LEVEL_LOW if demand == Setting.ENABLE else demand
    return actual == Setting.ENABLE or actual >= floor


def _switch_ok(demand: int, actual: int | None) -> bool:
    if demand == Setting.ANY:
        return True
    return actual == demand


def unmet_identity(demand: IToken, actual: IToken | None, who: str = "peer") -> list[str]:
    """Why ``actual`` does not satisfy the identity and auth methods ``demand`` asks for."""
    problems: list[str] = []
    demanded = demand.attributes()
    pinned = [a for a in _IDENTITY if a in demanded]
    switches = {m: Setting(_int(demanded.get(Attr(m), Setting.ANY))) for m in AuthMethod}
    constrained = pinned or any(s != Setting.ANY for s in switches.values())
    if not constrained:
        return problems
    if actual is None:
        return [f"no authenticated {who} identity"]
    have = actual.attributes()
    for attr in pinned:
        if have.get(attr) != demanded[attr]:
            problems.append(f"{who} {attr.name} differs from the required one")
    method = have.get(Attr.authenticationMethod)
    if method is None:
        problems.append(f"{who} authentication method unknown")
        return problems
    m = AuthMethod(_int(method))
    effective = {m}
    # A raw key that matches the pinned one is also a leap of faith (section 2.1.2).
    if m == AuthMethod.BTNS and Attr.pubKeyID in pinned and have.get(Attr.pubKeyID) == demanded[Attr.pubKeyID]:
        effective.add(AuthMethod.LEAPOFFAITH)
    # A leap of faith is BTNS with a key seen before: it meets whatever BTNS meets (a BTNS-only demand,
    # a connection latched at first contact and re-checked once the key is a known peer's).
    if m == AuthMethod.LEAPOFFAITH:
        effective.add(AuthMethod.BTNS)
    enabled = {k for k, s in switches.items() if s == Setting.ENABLE}
    if all(switches[e] == Setting.DISABLE for e in effective):
        problems.append(f"{who} authenticated by {m.name}, which is disabled")
    elif enabled and not (effective & enabled):
        problems.append(f"{who} authenticated by {m.name}, not one of {sorted(e.name for e in enabled)}")
    return problems


def unmet(demand: PToken, actual: PToken, policy: bool = True) -> list[str]:
    """Every way ``actual`` falls short of ``demand``; empty when it satisfies it. A pToken's attributes
    "can be used to enforce and negotiate required attribute values" (draft section 2.3.2): this is
    that check, with the rules of the module docstring.

    ``policy=False`` ignores policyName (latching: the protection must stay, not its name).
    An opportunistic demand (:data:`USE_POLICY`) is met by a clear connection; a protected
    one must meet its other attributes.
    """
    want, have = demand.attributes(), actual.attributes()
    problems: list[str] = []
    if policy and want.get(Attr.policyName) == USE_POLICY:
        if not actual.protected:
            return problems
    elif policy and (op := operator_policy(demand)) is not None:
        got = have.get(Attr.policyName)
        conn, child = op
        wanted = f"{conn}/{child}" if child else conn
        ok = isinstance(got, str) and (got == wanted if child else got.partition("/")[0] == conn)
        if not ok:
            problems.append(f"policyName: required {wanted}, have {got if isinstance(got, str) and got else 'nothing'}")
    for attr in _LEVELLED:
        d = _int(want.get(attr, Setting.ANY))
        if not _level_ok(d, _opt_int(have.get(attr))):
            problems.append(f"{attr.name}: required {Setting(d).name}, have {_name(have.get(attr))}")
    for attr in _SWITCHES:
        d = _int(want.get(attr, Setting.ANY))
        if not _switch_ok(d, _opt_int(have.get(attr))):
            problems.append(f"{attr.name}: required {Setting(d).name}, have {_name(have.get(attr))}")
    for attr, who in ((Attr.iToken, "peer"), (Attr.remote_iToken, "local")):
        tok = want.get(attr)
        if isinstance(tok, IToken):
            got_tok = have.get(attr)
            problems += unmet_identity(tok, got_tok if isinstance(got_tok, IToken) else None, who)
    return problems


def satisfies(demand: PToken, actual: PToken) -> bool:
    """True when ``actual`` meets every attribute ``demand`` asks for (draft section 2.3.2): no :func:`unmet`."""
    return not unmet(demand, actual)


def _name(value: object) -> str:
    return "nothing" if value is None else Setting(_int(value)).name


# -- helpers for backends that build connections from a demand (enforcement) -----------------


def demanded(demand: PToken, attr: Attr) -> int:
    """The value ``demand`` asks for ``attr`` (ANY when unset)."""
    return int(_int(demand.attributes().get(attr, Setting.ANY)))


def allowed_methods(demand: PToken) -> frozenset[AuthMethod]:
    """The authentication methods the demanded iToken's switches allow."""
    tok = demand.itoken
    if tok is None:
        return frozenset(AuthMethod)
    switches = {m: tok.auth_method(m) for m in AuthMethod}
    enabled = {m for m, s in switches.items() if s == Setting.ENABLE}
    if enabled:
        return frozenset(enabled)
    return frozenset(m for m, s in switches.items() if s != Setting.DISABLE)


def choose_proposals(demand: PToken, candidates: Iterable[tuple[str, Setting, Setting]]) -> list[str]:
    """The proposals (name, privacy level, integrity level) meeting the demanded levels, in order.

    Raises NotSupportedError (EOPNOTSUPP) when none does.
    """
    want_p, want_i = demanded(demand, Attr.privacyProtected), demanded(demand, Attr.integrityProtected)
    found = [
        name
        for name, p, i in candidates
        # Integrity-only proposals (ESP-NULL) only when privacy DISABLE is demanded, never as a fallback.
        if _level_ok(want_p, p) and _level_ok(want_i, i) and (p != Setting.DISABLE or want_p == Setting.DISABLE)
    ]
    if not found:
        raise NotSupportedError(
            f"no ESP proposal meets privacy {Setting(want_p).name} and integrity {Setting(want_i).name}"
        )
    return found
