"""The fast reading of the hot command lines (btns_vici.cli.fastargs) gives argparse's namespace.

Whenever :func:`parse_fast` answers, the full parser (btns_vici.cli.parser.build) must read
the same line to the very same namespace; whenever the line is anything else (help, version,
abbreviations, unknown words, errors) it must answer None and leave the line to argparse.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici.cli.fastargs import parse_fast
from btns_vici.cli.parser import build

PARSER = build()


def full(argv: list[str]) -> dict | None:
    """argparse's namespace as a dict, None when it exits (usage error, --help, --version)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return vars(PARSER.parse_args(argv))
        except SystemExit:
            return None


@pytest.mark.parametrize(
    "argv",
    [
        ["sockets"],
        ["sas"],
        ["--json", "sas"],
        ["sas", "--json"],
        ["--backend", "strongswan", "--vici-socket", "/run/x.vici", "sas", "--ike", "bench"],
        ["--backend=strongswan", "sas", "--ike-id=3", "--child", "c1", "--child-id", "7"],
        ["--netns", "a", "sockets", "--netns", "b"],
        ["sockets", "-tanp"],
        ["sockets", "-t", "-4", "state", "established", "( dport = :443 or sport = :443 )"],
        ["sockets", "-ul"],
        ["sockets", "--connected", "--tcp", "--udp", "--ipv4", "--ipv6", "--listening", "--all"],
        ["sockets", "--numeric", "--processes", "-6", "dst", "10.0.0.0/8", "and", "not", "dport", "=", "22"],
        ["sockets", "-", "x"],
        ["--backend", "", "sas"],
    ],
)
def test_plain_lines_read_as_argparse_reads_them(argv):
    fast = parse_fast(argv)
    assert fast is not None, argv
    assert vars(fast) == full(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["--help"],
        ["-V"],
        ["--version"],
        ["sas", "-h"],
        ["sockets", "--help"],
        ["watch"],
        ["token", "--pid", "1", "--fd", "3"],
        ["--back", "strongswan", "sas"],  # an abbreviation: argparse's
        ["sas", "--ike"],  # a missing value: argparse's error
        ["sas", "--ike", "--json"],
        ["sas", "extra"],
        ["sas", "-t"],
        ["--ike", "x", "sas"],
        ["sockets", "state", "established", "-t"],  # an option after FILTER words
        ["sockets", "--", "-t"],
        ["sockets", "-x"],
        ["sockets", "-1"],
        ["sockets", "--json=yes"],
        ["nosuchcommand"],
    ],
)
def test_anything_else_goes_to_argparse(argv):
    assert parse_fast(argv) is None


WORDS = st.sampled_from(
    [
        "sockets",
        "sas",
        "--json",
        "--backend",
        "--backend=x",
        "--vici-socket",
        "--netns",
        "--netns=ns",
        "--ike",
        "--ike-id",
        "--child",
        "--child-id=2",
        "--connected",
        "-t",
        "-u",
        "-4",
        "-6",
        "-l",
        "-a",
        "-n",
        "-p",
        "-tanp",
        "-ul4",
        "--tcp",
        "--all",
        "state",
        "established",
        "dport",
        "=",
        ":443",
        "(",
        ")",
        "-",
        "--",
        "-h",
        "-x",
        "--bogus",
        "strongswan",
        "",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(WORDS, max_size=8))
def test_fast_answer_is_argparse_answer(argv):
    fast = parse_fast(argv)
    if fast is not None:
        assert vars(fast) == full(argv), argv


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_without_argparse_prints_what_argparse_prints(flag, capsys):
    from btns_vici.cli import main

    assert main([flag]) == 0
    fast = capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        PARSER.parse_args([flag])
    assert done.value.code == 0
    assert capsys.readouterr().out == fast == f"btns {__import__('btns_vici').__version__}\n"
