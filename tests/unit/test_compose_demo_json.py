"""The compose demo moves pTokens from the containers to the host as JSON: nothing may be lost."""

from __future__ import annotations

import json

from btns_lab.compose.tokens_json import ptoken_from_json, ptoken_to_json
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.derive import itoken_for, restored_ptoken
from btns_vici.core.records import Identity
from btns_vici.core.selectors import TrafficSelector
from btns_vici.core.tokens import PToken


def _token() -> PToken:
    key = bytes.fromhex("302a300506032b6570032100") + bytes(range(32))
    return restored_ptoken(
        {
            Attr.privacyProtected: Setting.LEVEL_HIGH,
            Attr.integrityProtected: Setting.LEVEL_MEDIUM,
            Attr.tunnelMode: Setting.ENABLE,
            Attr.informationString: "tcp 10.0.0.1:5 -> 10.0.0.2:7 is protected",
            Attr.policyName: "btns-init-0123456789ab/btns-init-0123456789ab",
            Attr.iToken: itoken_for(Identity("peer", AuthMethod.BTNS, public_key=key, auth_class="public key")),
        },
        (TrafficSelector.from_network("10.0.0.1/32"),),
        (TrafficSelector.from_network("10.0.0.2/32", 6, 7, 7),),
    )


def test_ptoken_survives_json() -> None:
    p = _token()
    q = ptoken_from_json(json.loads(json.dumps(ptoken_to_json(p))))
    assert q == p
    assert q.attributes().keys() == p.attributes().keys()
    assert q.information_string == p.information_string and q.policy_name == p.policy_name
    assert q.itoken is not None and q.itoken.pub_key_id == p.itoken.pub_key_id  # type: ignore[union-attr]
    assert q.itoken.channel_binding == p.itoken.channel_binding  # type: ignore[union-attr]
    assert (q.local_ts, q.remote_ts) == (p.local_ts, p.remote_ts)


def test_json_difference_is_seen() -> None:
    data = ptoken_to_json(_token())
    data["remote_ts"] = [["10.0.0.3", "10.0.0.3", 0, 0, 65535]]
    assert ptoken_from_json(data) != _token()
