"""The ss(8) filter grammar of `btns sockets` (btns_vici.cli.ssfilter), on made-up sock_diag entries."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from btns_vici.cli.sockdiag import SocketEntry, state_mask
from btns_vici.cli.ssfilter import ALL_STATES, LISTENING, FilterError, parse


def entry(state="ESTAB", src="10.0.0.1", sport=40000, dst="10.0.0.2", dport=443, proto=socket.IPPROTO_TCP):
    local, remote = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    return SocketEntry(proto, family, state, local, sport, remote, dport, 1, 0)


E = entry()
V6 = entry(src="fd00::1", dst="fd00::2", dport=22)
LST = entry(state="LISTEN", dst="0.0.0.0", dport=0, sport=22)


@pytest.mark.parametrize(
    ("words", "matches"),
    [
        (["dport", "=", ":443"], {E}),
        (["dport = :https"], {E}),
        (["dport", "eq", "443"], {E}),
        (["dport", "!=", "443"], {V6, LST}),
        (["sport", ">", "1024"], {E, V6}),
        (["sport", "le", "22"], {LST}),
        (["dst", "10.0.0.0/24"], {E}),
        (["dst", "10.0.0.2:443"], {E}),
        (["dst", "*:22"], {V6}),
        (["dst", ":22"], {V6}),
        (["dst", "fd00::2"], {V6}),
        (["dst", "[fd00::2]:22"], {V6}),
        (["dst", "[fd00::]/64"], {V6}),
        (["dst", "fd00::/64"], {V6}),
        (["src", "10.0.0.1"], {E, LST}),
        (["( sport = :22 or dport = :22 )"], {V6, LST}),
        (["sport", "=", "22", "||", "dport", "=", "22"], {V6, LST}),
        (["not", "dst", "10.0.0.2"], {V6, LST}),
        (["!", "src", "10.0.0.0/8"], {V6}),
        (["src", "10.0.0.1", "dport", "=", "443"], {E}),  # juxtaposition is "and"
        (["src", "10.0.0.1", "and", "not", "sport", "=", "22"], {E}),
        (["src", "10.0.0.1", "&&", "sport", "=", "22"], {LST}),
        (["state", "established"], {E, V6}),
        (["state", "listening"], {LST}),
        (["state", "connected"], {E, V6}),
        (["exclude", "established"], {LST}),
        (["state", "established", "dport", "=", "22"], {V6}),
        (["state", "all"], {E, V6, LST}),
    ],
)
def test_filters(words, matches):
    sel = parse(words)
    assert {e for e in (E, V6, LST) if sel(e)} == matches


def test_v4_filter_matches_v4_mapped_v6_sockets():
    mapped = entry(src="::ffff:10.0.0.1", dst="::ffff:10.0.0.2")
    assert parse(["dst", "10.0.0.2"])(mapped)


def test_defaults_and_groups():
    assert parse([]).states is None and parse([]).predicate is None
    assert parse([], LISTENING).states == LISTENING
    assert parse(["state", "established"], LISTENING).states == {"ESTAB"}
    assert parse(["exclude", "time-wait"]).states == ALL_STATES - {"TIME-WAIT"}
    assert "TIME-WAIT" in parse(["state", "bucket"]).states and "ESTAB" not in parse(["state", "bucket"]).states
    assert parse(["state", "synchronized"]).states == parse(["state", "connected"]).states - {"SYN-SENT"}


def test_state_mask_is_the_kernel_bits():
    assert state_mask(["ESTAB"]) == 1 << 1 and state_mask(["LISTEN", "UNCONN"]) == (1 << 10) | (1 << 7)
    assert state_mask(None) == 0xFFFFFFFF


@pytest.mark.parametrize(
    "words",
    [
        ["state"],
        ["state", "sideways"],
        ["dport", "=", "99999"],
        ["dport", "=", "nosvc"],
        ["dst"],
        ["dst", "300.1.1.1"],
        ["(", "dport", "=", "1"],
        ["dport", "=", "1", ")"],
        ["frob"],
        ["dst", "[fd00::1"],
        ["and"],
    ],
)
def test_syntax_errors(words):
    with pytest.raises(FilterError):
        parse(words)
