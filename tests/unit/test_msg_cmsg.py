"""A datagram pToken can never be silently ignored: plain sendmsg of its message fails EINVAL."""

from __future__ import annotations

import errno
import socket

import pytest

import btns_vici
from btns_vici import PToken, Setting, capi


def test_plain_sendmsg_of_a_message_carrying_a_ptoken_is_refused_by_the_kernel() -> None:
    demand = PToken()
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.2)
        m = btns_vici.MsgHdr(iov=[b"unchecked"], name=rx.getsockname())
        capi.ipsec_set_msg_pToken(m, demand)
        with pytest.raises(OSError) as e:
            tx.sendmsg(m.iov, m.control, 0, m.name)  # what a program that skips btns_vici.sendmsg does
        assert e.value.errno == errno.EINVAL
        with pytest.raises(TimeoutError):
            rx.recv(64)  # nothing was sent
