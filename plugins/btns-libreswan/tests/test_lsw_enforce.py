"""Pure parts of set_socket_pToken for libreswan: which conn a demanded pToken becomes."""

from __future__ import annotations

import base64
import errno
import re
from pathlib import Path

import pytest

from btns_libreswan.enforce import auth, conn_name, conn_text, demand_reqid, esp_proposals, mode
from btns_libreswan.ipsecconf import conn_keys, parse_sections
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.errors import NotSupportedError
from btns_vici.core.tokens import IToken, PToken

SHOWN = (Path(__file__).parent / "data" / "showhostkey-4.10.txt").read_text()
PUBKEY = base64.b64decode(re.search(r"leftpubkey=(\S+)", SHOWN).group(1))  # type: ignore[union-attr]
ED25519 = bytes.fromhex("302a300506032b6570032100") + b"\x11" * 32


def demand(*methods: AuthMethod, key: bytes | None = None, **levels: Setting) -> PToken:
    tok = PToken()
    for attr, value in levels.items():
        setattr(tok, attr, value)
    if methods or key:
        it = IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=key) if key else IToken()
        for m in AuthMethod:
            it.set_auth_method(m, Setting.ENABLE if m in methods else Setting.DISABLE)
        tok.itoken = it
    return tok


def test_btns_demand_becomes_null_auth_transport() -> None:
    d = demand(AuthMethod.BTNS)
    assert auth(d) == ("null", None) and mode(d) == "transport"
    text = conn_text("btns-init-x", "10.0.0.1", "10.0.0.2", d, None, "aes_gcm256-sha2_256;dh19")
    section = parse_sections(text)["btns-init-x"]
    assert section["authby"] == "null" and section["leftid"] == "%null" and section["type"] == "transport"
    assert section["reqid"] == str(demand_reqid(d)) and 1 <= demand_reqid(d) <= 16000
    assert section["ike"] == "aes_gcm256-sha2_256;dh19" and section["right"] == "10.0.0.2"


def test_pinned_rsa_key_becomes_rightrsasigkey_of_the_same_key() -> None:
    d = demand(AuthMethod.BTNS, AuthMethod.LEAPOFFAITH, key=PUBKEY)
    assert auth(d) == ("rsasig", PUBKEY)
    text = conn_text("btns-resp-y", "10.0.0.1", None, d, "ab" * 20)
    keys = conn_keys(parse_sections(text))["btns-resp-y"]
    assert keys.right_key == PUBKEY and keys.right_host == "%any" and keys.left_ckaid == "ab" * 20


def test_levels_choose_proposals() -> None:
    assert esp_proposals(demand(privacy_protected=Setting.LEVEL_HIGH, integrity_protected=Setting.LEVEL_HIGH)) == [
        "aes_gcm256",
        "chacha20_poly1305",
        "aes256-sha2_512",
    ]
    assert "aes128-sha1" in esp_proposals(demand())


@pytest.mark.parametrize(
    "bad",
    [
        demand(AuthMethod.PRESHAREDKEY),
        demand(AuthMethod.PKIX_TRUSTED),
        demand(AuthMethod.BTNS, key=ED25519),  # libreswan 4 raw keys are RSA only
        demand(privacy_protected=Setting.DISABLE),
        demand(tunnel_mode=Setting.ENABLE),
    ],
)
def test_unbuildable_demands_are_eopnotsupp(bad: PToken) -> None:
    with pytest.raises(NotSupportedError) as exc:
        conn_text("n", "10.0.0.1", "10.0.0.2", bad, None)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_names_are_stable_per_demand_and_endpoints() -> None:
    d = demand(AuthMethod.BTNS)
    assert conn_name("init", "a", "b", d) == conn_name("init", "a", "b", demand(AuthMethod.BTNS))
    assert conn_name("init", "a", "b", d) != conn_name("init", "a", "c", d)
    assert demand_reqid(d) != demand_reqid(demand(AuthMethod.BTNS, key=PUBKEY))
