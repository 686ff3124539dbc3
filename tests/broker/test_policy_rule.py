"""btnsd.toml [[allow]] rules and answers, sans I/O: what mypy --strict found in the broker."""

from __future__ import annotations

import errno
import grp

import pytest

from btns_vici.broker.client import _token
from btns_vici.broker.policy import Rule, parse
from btns_vici.broker.protocol import FrameError
from btns_vici.core.tokens import PToken


def test_a_group_named_by_its_number_matches_like_a_user_named_by_his() -> None:
    named = grp.getgrgid(0).gr_name  # gid 0 has a name ("root"): the number alone used to match nothing
    (by_number,) = parse({"allow": [{"groups": [0]}]}).rules
    assert by_number.groups == frozenset({"0"})
    assert by_number.matches(4242, frozenset({0}))
    assert Rule(users=frozenset(), groups=frozenset({named})).matches(4242, frozenset({0}))
    assert not by_number.matches(4242, frozenset({4243}))
    assert parse({"allow": [{"users": [0]}]}).rules[0].matches(0, frozenset())


def test_an_answer_without_a_ptoken_is_a_protocol_error() -> None:
    token = PToken()
    assert _token({"token": token}) is token
    for bad in ({}, {"token": None}, {"token": {"kind": "ptoken"}}):
        with pytest.raises(FrameError) as e:
            _token(bad)
        assert e.value.errno == errno.EPROTO
