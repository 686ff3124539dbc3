"""The backend kit's pure parts: lookup, demand-derived names and numbers, proposals, the watch thread."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
import threading
from collections.abc import Callable

import pytest

from btns_vici import backendkit as kit
from btns_vici.backend import SAEvent
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.errors import DaemonDownError, NotSupportedError
from btns_vici.core.records import ChildSA, Identity, IkeSA
from btns_vici.core.selectors import Flow, TrafficSelector
from btns_vici.core.tokens import IToken, PToken

A, B = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")


def _child(name: str, port: int, state: str = "INSTALLED") -> ChildSA:
    return ChildSA(
        name=name,
        uniqueid=name,
        reqid=1,
        state=state,
        mode="TUNNEL",
        protocol="ESP",
        spi_in=1,
        spi_out=2,
        encr_alg="AES_GCM_16",
        encr_keysize=256,
        integ_alg=None,
        local_ts=(TrafficSelector.from_network("10.0.0.1/32", socket.IPPROTO_TCP, port, port),),
        remote_ts=(TrafficSelector.from_network("10.0.0.2/32"),),
    )


def _ike(name: str, *children: ChildSA, state: str = "ESTABLISHED") -> IkeSA:
    me, peer = Identity("a", AuthMethod.BTNS), Identity("b", AuthMethod.BTNS)
    return IkeSA("test", name, name, 2, state, A, B, me, peer, children)


def test_find_in_takes_the_first_established_installed_child() -> None:
    sas = [
        _ike("down", _child("c0", 80), state="CONNECTING"),
        _ike("one", _child("c1", 80, state="DELETING"), _child("c2", 80)),
        _ike("two", _child("c3", 80)),
    ]
    hit = kit.find_in(sas, Flow(socket.IPPROTO_TCP, A, 80, B, 5000))
    assert hit is not None and (hit[0].name, hit[1].name) == ("one", "c2")
    assert kit.find_in(sas, Flow(socket.IPPROTO_TCP, A, 81, B, 5000)) is None
    assert kit.find_in([], Flow(socket.IPPROTO_TCP, A, 80, B, 5000)) is None


def test_demand_names_are_stable_per_parts_and_nul_separated() -> None:
    digest = hashlib.sha256(b"init\0a\0b\0" + b"\x01\x02\0").hexdigest()[:12]
    assert kit.demand_name("init", "a", "b", b"\x01\x02") == f"btns-init-{digest}"
    assert kit.demand_name("init", "ab", "") != kit.demand_name("init", "a", "b")  # the separator counts
    assert kit.demand_name("resp", "a", "b") != kit.demand_name("init", "a", "b")
    assert kit.demand_name("init", "a").startswith(kit.CONN_PREFIX)


def test_demand_numbers_stay_in_range_and_are_stable() -> None:
    numbers = {kit.demand_number(16000, "null", "transport", str(i)) for i in range(2000)}
    assert min(numbers) >= 1 and max(numbers) <= 16000 and len(numbers) > 1800
    assert kit.demand_number(7, "x") == kit.demand_number(7, "x")
    assert 1 + int.from_bytes(hashlib.sha256(b"x\0").digest()[:4], "big") % 7 == kit.demand_number(7, "x")


def _only(method: AuthMethod) -> IToken:
    tok = IToken()
    tok.set_auth_method(method, Setting.ENABLE)
    return tok


def test_raw_key_methods_and_proposals() -> None:
    demand = PToken()
    demand.itoken = _only(AuthMethod.BTNS)
    assert kit.allows_raw_keys(demand) and AuthMethod.LEAPOFFAITH in kit.RAW_KEY_METHODS
    psk = PToken()
    psk.itoken = _only(AuthMethod.PRESHAREDKEY)
    assert not kit.allows_raw_keys(psk)
    table: list[kit.Proposal] = [
        ("strong", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
        ("weak", Setting.LEVEL_LOW, Setting.LEVEL_LOW),
        ("null", Setting.DISABLE, Setting.LEVEL_HIGH),
    ]
    assert kit.esp_proposals(PToken(), table) == ["strong", "weak"]  # ESP-NULL only when asked for
    demand.privacy_protected = Setting.LEVEL_HIGH
    assert kit.esp_proposals(demand, table) == ["strong"]
    with pytest.raises(NotSupportedError) as err:
        kit.esp_proposals(demand, table[1:2])
    assert err.value.errno == errno.EOPNOTSUPP


def _collect() -> tuple[list[SAEvent], threading.Event, Callable[[SAEvent], None]]:
    got: list[SAEvent] = []
    done = threading.Event()

    def callback(event: SAEvent) -> None:
        got.append(event)
        if event.kind == "reset" or len(got) >= 3:
            done.set()

    return got, done, callback


def test_a_broken_stream_is_one_reset_then_the_watch_ends() -> None:
    got, done, callback = _collect()
    rounds = iter([[SAEvent("ike-up")], []])
    closed = threading.Event()

    def poll() -> list[SAEvent]:
        try:
            return next(rounds)
        except StopIteration:
            raise DaemonDownError("gone") from None

    stop = kit.watch_thread("btns-test-watch", poll, callback, close=closed.set)
    try:
        assert done.wait(5) and closed.wait(5)
        assert [e.kind for e in got] == ["ike-up", "reset"]
    finally:
        stop()


def test_a_polled_daemon_resumes_after_a_reset() -> None:
    got: list[SAEvent] = []
    done = threading.Event()
    calls = [0]

    def poll() -> list[SAEvent]:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ECONNREFUSED, "pluto restarting")
        return [SAEvent("child-up")] if calls[0] in (1, 3) else []

    def callback(event: SAEvent) -> None:
        got.append(event)
        if len(got) >= 3:
            done.set()

    stop = kit.watch_thread("btns-test-watch", poll, callback, resume=True)
    try:
        assert done.wait(5)
        assert [e.kind for e in got[:3]] == ["child-up", "reset", "child-up"]
    finally:
        stop()


def test_the_stopper_stops_the_thread() -> None:
    polled = threading.Event()

    def poll() -> list[SAEvent]:
        polled.set()
        return []

    stop = kit.watch_thread("btns-test-watch-stop", poll, lambda e: None, interval=0.01)
    assert polled.wait(5)
    stop()
    assert not [t for t in threading.enumerate() if t.name == "btns-test-watch-stop"]
