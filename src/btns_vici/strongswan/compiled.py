"""charon's traffic selectors as integer tuples, matched without ipaddress objects.

A selector is ``(version, first address, last address, protocol, lowest port, highest port)``
(:func:`.coverage.match` matches a flow against a tuple of them). Negotiated ones come from
:class:`~btns_vici.core.selectors.TrafficSelector` records (:func:`compiled`); configured ones
from ``list-conns`` strings (:func:`config_selectors`), where the IPv4 forms charon prints for
per-port children (thousands per connection) are read by one regular expression and anything
else goes through the strict :func:`.parse.parse_ts`. Shared by the SA index, which picks
candidate child configs with them, and the listing, which writes them to the coverage cache.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..core.errors import ProtocolError
from ..core.selectors import PROTO_ANY, TrafficSelector
from . import parse

#: Distinct selector strings compiled and remembered (a connection's children repeat a few).
MAX_SPECS = 1 << 16

Compiled = tuple[tuple[int, int, int, int, int, int], ...]


def compiled(ts: tuple[TrafficSelector, ...]) -> Compiled:
    """Selectors as (version, first, last, proto, port_lo, port_hi) integers for :func:`.coverage.match`."""
    return tuple((t.version, int(t.start), int(t.end), t.proto, t.port_lo, t.port_hi) for t in ts)


def config_selectors(cfg: Mapping[str, Any], key: str) -> Compiled:
    """Configured selectors (list-conns) compiled for :func:`.coverage.match`; ``dynamic`` is any address."""
    raw = cfg.get(key, [])
    if not isinstance(raw, list):
        raise ProtocolError(f"list-conns {key!r} is not a list")
    out: list[tuple[int, int, int, int, int, int]] = []
    for item in raw:
        spec = parse.text(item, key)
        addr, bracket, rest = spec.partition("[")
        if addr.strip() == "dynamic":
            for any_addr in ("0.0.0.0/0", "::/0"):
                out.extend(spec_compiled(any_addr + bracket + rest))
        else:
            out.extend(spec_compiled(spec))
    return tuple(out)


#: ``a.b.c.d/n`` with an optional ``[tcp|udp|N]`` or ``[proto/port]`` / ``[proto/lo-hi]``: the
#: forms charon prints for per-port children (thousands per connection), compiled without
#: ipaddress objects; anything else goes through parse.parse_ts.
_TS_V4 = re.compile(
    r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})(?:\[(tcp|udp|\d{1,3})(?:/(\d{1,5})(?:-(\d{1,5}))?)?\])?",
    re.ASCII,
)
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_spec_cache: dict[str, Compiled] = {}


def _fast_v4(spec: str) -> Compiled | None:
    m = _TS_V4.fullmatch(spec)
    if m is None:
        return None
    octets = m.group(1, 2, 3, 4)
    if any(len(o) > 1 and o[0] == "0" for o in octets):
        return None  # leading zeros: let the strict parser refuse them
    value = 0
    for o in octets:
        n = int(o)
        if n > 255:
            return None
        value = value << 8 | n
    bits = int(m[5])
    if bits > 32:
        return None
    host = (1 << (32 - bits)) - 1
    first, last = value & ~host & 0xFFFFFFFF, value | host
    pname, lo_s, hi_s = m[6], m[7], m[8]
    proto = PROTO_ANY if pname is None else _PROTO_NUMBERS.get(pname, None)
    if proto is None:
        proto = int(pname)
        if proto > 255:
            return None
    lo, hi = 0, 65535
    if lo_s is not None:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s is not None else lo
        if hi > 65535 or lo > hi:
            return None
    return ((4, first, last, proto, lo, hi),)


def spec_compiled(spec: str) -> Compiled:
    """One configured selector string compiled (cached: a connection's children repeat them)."""
    hit = _spec_cache.get(spec)
    if hit is None:
        hit = _fast_v4(spec.strip()) or compiled((parse.parse_ts(spec),))
        if len(_spec_cache) >= MAX_SPECS:
            _spec_cache.clear()
        _spec_cache[spec] = hit
    return hit


__all__ = ["Compiled", "compiled", "config_selectors", "spec_compiled"]
