"""RFC 3110 <-> SubjectPublicKeyInfo, checked against libreswan 4.10's own two printouts of one key."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from btns_libreswan.rsakey import (
    KeyFormatError,
    ckaid,
    keyid,
    numbers_from_rfc3110,
    numbers_from_spki,
    rfc3110_from_numbers,
    spki_from_numbers,
    spki_from_pubkey,
    spki_from_rsasigkey,
)

DATA = Path(__file__).parent / "data"
SHOWN = (DATA / "showhostkey-4.10.txt").read_text()
RSASIGKEY = re.search(r"leftrsasigkey=(\S+)", SHOWN).group(1)  # type: ignore[union-attr]
PUBKEY = re.search(r"leftpubkey=(\S+)", SHOWN).group(1)  # type: ignore[union-attr]


def test_rsasigkey_converts_to_the_spki_pluto_prints() -> None:
    assert spki_from_rsasigkey(RSASIGKEY) == base64.b64decode(PUBKEY)


def test_keyid_and_ckaid_match_showhostkey() -> None:
    spki = spki_from_pubkey(PUBKEY)
    assert keyid(spki) == "AwEAAdokY"
    assert ckaid(spki) == "62a15f96cd64c914a37763d8f87c4f6cbe7b2708"


def test_round_trip_small_and_long_exponent() -> None:
    n = (1 << 2047) | 0x1234567
    for e in (3, 65537, 1 << 2100 | 1):  # the last needs RFC 3110's 3-octet length form
        blob = rfc3110_from_numbers(n, e)
        assert numbers_from_rfc3110(blob) == (n, e)
        assert numbers_from_spki(spki_from_numbers(n, e)) == (n, e)
    assert rfc3110_from_numbers(n, 1 << 2100 | 1)[0] == 0


def test_hex_form_is_accepted() -> None:
    blob = base64.b64decode(RSASIGKEY[2:])
    assert spki_from_rsasigkey("0x" + blob.hex()) == base64.b64decode(PUBKEY)


@pytest.mark.parametrize("bad", ["", "0s", "0s!!!notbase64", "0sAQ==", "%cert", "0xZZ", "0sAAAA"])
def test_malformed_rsasigkeys_raise(bad: str) -> None:
    with pytest.raises(KeyFormatError):
        spki_from_rsasigkey(bad)


def test_non_rsa_or_truncated_spki_raises() -> None:
    ed25519 = base64.b64encode(bytes.fromhex("302a300506032b6570032100") + b"\x11" * 32).decode()
    with pytest.raises(KeyFormatError):
        spki_from_pubkey(ed25519)
    with pytest.raises(KeyFormatError):
        spki_from_pubkey(PUBKEY[:-8])
