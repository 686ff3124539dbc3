"""aio's flow queries with btnsd as the authority: EOPNOTSUPP, as api's, never a crash.

btnsd answers only for sockets it receives; a bare flow cannot be sent to it. Typing aio with
the authority ``api.resolve_backend`` really returns (a Backend or a BrokerClient) showed that
``aio.ptoken_for_flow`` handed a BrokerClient to the local verifier (AttributeError).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

import pytest

from btns_vici import aio
from btns_vici.broker.client import BrokerClient
from btns_vici.core.selectors import Flow

FLOW = Flow(socket.IPPROTO_TCP, ipaddress.ip_address("10.9.0.1"), 40000, ipaddress.ip_address("10.9.0.2"), 443)


def test_ptoken_for_flow_with_the_broker_is_eopnotsupp(tmp_path) -> None:
    broker = BrokerClient(str(tmp_path / "btnsd.sock"))  # never contacted: refused before any request
    with pytest.raises(OSError) as e:
        asyncio.run(aio.ptoken_for_flow(FLOW, broker))
    assert e.value.errno == errno.EOPNOTSUPP and "ptoken_for_flow" in str(e.value)


def test_connection_info_of_a_bare_flow_with_the_broker_is_eopnotsupp(tmp_path) -> None:
    broker = BrokerClient(str(tmp_path / "btnsd.sock"))
    for inline in (False, True):
        with pytest.raises(OSError) as e:
            asyncio.run(
                aio.connection_info(client=("10.9.0.2", 443), server=("10.9.0.1", 40000), backend=broker, inline=inline)
            )
        assert e.value.errno == errno.EOPNOTSUPP
