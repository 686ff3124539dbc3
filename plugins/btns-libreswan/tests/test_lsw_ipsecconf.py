"""ipsec.conf reading: %default, also=, include, comments, both key forms."""

from __future__ import annotations

import re
from pathlib import Path

from btns_libreswan.ipsecconf import conn_keys, load, parse_sections, resolve
from btns_libreswan.rsakey import spki_from_pubkey, spki_from_rsasigkey
from btns_libreswan.watch import diff_events

SHOWN = (Path(__file__).parent / "data" / "showhostkey-4.10.txt").read_text()
RSASIGKEY = re.search(r"leftrsasigkey=(\S+)", SHOWN).group(1)  # type: ignore[union-attr]
PUBKEY = re.search(r"leftpubkey=(\S+)", SHOWN).group(1)  # type: ignore[union-attr]

CONF = f"""
config setup
\tlogfile=/tmp/x   # a comment

conn %default
\tauthby=rsasig

conn base
\tleft=10.0.0.1
\tleftid=@me
\tleftrsasigkey={RSASIGKEY}

conn peer
\talso=base
\tright=10.0.0.2
\trightid=@them  # trailing comment
\trightpubkey="{PUBKEY}"

conn broken
\tleft=10.0.0.1
\trightrsasigkey=0sNOT-BASE64!
\trightrsasigkey2=%cert
"""


def test_also_and_default_are_resolved() -> None:
    sections = parse_sections(CONF)
    merged = resolve(sections, "peer")
    assert merged["authby"] == "rsasig" and merged["left"] == "10.0.0.1" and merged["rightid"] == "@them"


def test_both_key_forms_give_the_same_spki() -> None:
    keys = conn_keys(parse_sections(CONF))
    assert keys["peer"].left_key == spki_from_rsasigkey(RSASIGKEY) == spki_from_pubkey(PUBKEY)
    assert keys["peer"].right_key == keys["peer"].left_key
    assert keys["broken"].right_key is None  # unreadable key: no key (fail closed)
    assert "%default" not in keys


def test_include_relative_with_glob(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "x.conf").write_text(CONF)
    (tmp_path / "ipsec.conf").write_text("config setup\n\nconn %default\n\tike=aes\ninclude conf.d/*.conf\n")
    keys = load(str(tmp_path / "ipsec.conf"))
    assert keys["peer"].right_id == "@them" and keys["peer"].left_key is not None


def test_watch_diff_reports_up_and_down() -> None:
    before = {1: ("c", False, True), 2: ("c", True, False)}
    now = {2: ("c", True, True), 3: ("d", False, False)}
    kinds = [(e.kind, e.ike_uniqueid or e.child_uniqueid) for e in diff_events(before, now)]
    assert kinds == [("ike-down", "1"), ("child-up", "2")]  # #3 is not established yet: no event
