from __future__ import annotations

import ipaddress

import pytest

from btns_vici.core.selectors import Flow, TrafficSelector, flow_covered

ip = ipaddress.ip_address


def test_covers_address_proto_ports() -> None:
    ts = TrafficSelector.from_network("10.0.0.0/24", 6, 80, 90)
    assert ts.covers(ip("10.0.0.7"), 6, 85)
    assert not ts.covers(ip("10.0.1.7"), 6, 85)
    assert not ts.covers(ip("10.0.0.7"), 17, 85)
    assert not ts.covers(ip("10.0.0.7"), 6, 91)
    assert not ts.covers(ip("::1"), 6, 85)
    assert TrafficSelector.from_network("::/0").covers(ip("fd00::1"), 17, 1)


def test_flow_covered_and_v4_mapped() -> None:
    f = Flow(17, ip("::ffff:10.0.0.1"), 5000, ip("::ffff:10.0.0.2"), 53)
    assert flow_covered(
        f,
        (TrafficSelector.from_network("10.0.0.1/32"),),
        (TrafficSelector.from_network("10.0.0.2/32", 17, 53, 53),),
    )
    assert not flow_covered(
        f, (TrafficSelector.from_network("10.0.0.1/32"),), (TrafficSelector.from_network("10.0.0.2/32", 6),)
    )


def test_invalid_selectors_rejected_and_str() -> None:
    with pytest.raises(ValueError):
        TrafficSelector(ip("10.0.0.2"), ip("10.0.0.1"))
    with pytest.raises(ValueError):
        TrafficSelector(ip("10.0.0.1"), ip("::1"))
    assert str(TrafficSelector.from_network("10.0.0.1/32", 6, 80, 80)) == "10.0.0.1/32[6/80]"
    assert str(Flow(6, ip("fd00::1"), 1, ip("fd00::2"), 2)) == "tcp [fd00::1]:1 -> [fd00::2]:2"
