"""pTokens as JSON: how the peer programs in the containers hand their tokens to the host; nothing is lost."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from btns_vici.core.constants import Attr
from btns_vici.core.derive import restored_ptoken
from btns_vici.core.selectors import TrafficSelector
from btns_vici.core.tokens import IToken, PToken


def ptoken_to_json(p: PToken) -> dict[str, Any]:
    """Every attribute of a pToken (iTokens in their serialized form) and its traffic selectors."""
    attrs: dict[str, Any] = {}
    for attr, value in p.attributes().items():
        attrs[attr.name] = {"itoken": value.to_bytes().hex()} if isinstance(value, IToken) else value
    return {
        "attributes": attrs,
        "local_ts": [_ts_to_json(ts) for ts in p.local_ts],
        "remote_ts": [_ts_to_json(ts) for ts in p.remote_ts],
    }


def ptoken_from_json(data: Mapping[str, Any]) -> PToken:
    """The pToken that :func:`ptoken_to_json` described."""
    attributes: dict[Attr, Any] = {}
    for name, value in data["attributes"].items():
        if isinstance(value, dict):
            value = IToken.from_bytes(bytes.fromhex(value["itoken"]))
        attributes[Attr[name]] = value
    return restored_ptoken(
        attributes,
        (_ts_from_json(ts) for ts in data["local_ts"]),
        (_ts_from_json(ts) for ts in data["remote_ts"]),
    )


def _ts_to_json(ts: TrafficSelector) -> list[Any]:
    return [str(ts.start), str(ts.end), ts.proto, ts.port_lo, ts.port_hi]


def _ts_from_json(v: Sequence[Any]) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_address(v[0]), ipaddress.ip_address(v[1]), int(v[2]), int(v[3]), int(v[4]))
