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

from .attributes import IDENTITY_ATTRS, LEVEL_ATTRS, OBJECT_ATTRS, SWITCH_ATTRS
from .constants import Attr, AuthMethod, Setting
from .errors import NotSupportedError
from .tokens import IToken, PToken


def _wanted(token: IToken | PToken, attr: Attr) -> Setting:
    """The level or switch a template asks for: ANY (no demand) when it holds none."""
    value = token.setting(attr)
    return Setting.ANY if value is None else value


#: policyName value meaning "use IPsec if the peer can, else clear".
USE_POLICY = "btns:use"
#: policyName values starting with this are library keywords, never operator connections.
KEYWORD_PREFIX = "btns:"


def is_opportunistic(demand: PToken) -> bool:
    """True for a "use IPsec if the peer can, else clear" demand (policyName ``btns:use``)."""
    return demand.policy_name == USE_POLICY


def operator_policy(demand: PToken) -> tuple[str, str | None] | None:
    """The demanded operator connection (conn, child or None), from policyName ``conn[/child]``."""
    name = demand.policy_name
    if not isinstance(name, str) or not name or name.startswith(KEYWORD_PREFIX):
        return None
    conn, _, child = name.partition("/")
    return conn, (child or None)


def _itoken_constrains(tok: object) -> bool:
    if not isinstance(tok, IToken):
        return False
    attrs = tok.attributes()
    return any(a in attrs for a in IDENTITY_ATTRS) or any(_wanted(tok, Attr(m)) != Setting.ANY for m in AuthMethod)


def is_no_demand(demand: PToken) -> bool:
    """True when ``demand`` asks for nothing: the system default (nothing forced, no guard)."""
    if any(_wanted(demand, a) != Setting.ANY for a in (*LEVEL_ATTRS, *SWITCH_ATTRS)):
        return False
    if demand.policy_name is not None:
        return False
    return not any(_itoken_constrains(demand.identity(a)) for a in OBJECT_ATTRS)


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
    pinned = [a for a in IDENTITY_ATTRS if a in demanded]
    switches = {m: _wanted(demand, Attr(m)) for m in AuthMethod}
    constrained = pinned or any(s != Setting.ANY for s in switches.values())
    if not constrained:
        return problems
    if actual is None:
        return [f"no authenticated {who} identity"]
    have = actual.attributes()
    for attr in pinned:
        if have.get(attr) != demanded[attr]:
            problems.append(f"{who} {attr.name} differs from the required one")
    m = actual.authentication_method
    if m is None:
        problems.append(f"{who} authentication method unknown")
        return problems
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
    problems: list[str] = []
    if policy and demand.policy_name == USE_POLICY:
        if not actual.protected:
            return problems
    elif policy and (op := operator_policy(demand)) is not None:
        got = actual.policy_name
        conn, child = op
        ok = got is not None and (got == f"{conn}/{child}" if child else got.partition("/")[0] == conn)
        if not ok:
            problems.append(f"policyName: required {demand.policy_name}, have {got or 'nothing'}")
    for attr in LEVEL_ATTRS:
        d = _wanted(demand, attr)
        if not _level_ok(d, actual.setting(attr)):
            problems.append(f"{attr.name}: required {d.name}, have {_name(actual.setting(attr))}")
    for attr in SWITCH_ATTRS:
        d = _wanted(demand, attr)
        if not _switch_ok(d, actual.setting(attr)):
            problems.append(f"{attr.name}: required {d.name}, have {_name(actual.setting(attr))}")
    for attr, who in ((Attr.iToken, "peer"), (Attr.remote_iToken, "local")):
        tok = demand.identity(attr)
        if tok is not None:
            problems += unmet_identity(tok, actual.identity(attr), who)
    return problems


def satisfies(demand: PToken, actual: PToken) -> bool:
    """True when ``actual`` meets every attribute ``demand`` asks for (draft section 2.3.2): no :func:`unmet`."""
    return not unmet(demand, actual)


def _name(value: Setting | None) -> str:
    return "nothing" if value is None else value.name


# -- helpers for backends that build connections from a demand (enforcement) -----------------


def demanded(demand: PToken, attr: Attr) -> int:
    """The value ``demand`` asks for ``attr`` (ANY when unset)."""
    return int(_wanted(demand, attr))


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
