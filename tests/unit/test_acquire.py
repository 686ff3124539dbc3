"""The pure parts of btns_vici.acquire: the trap and backstop policy messages, the marks, the
sock_diag mark filter (decoded with the project's own XFRM wire decoder)."""

from __future__ import annotations

import socket
import struct

import pytest

from btns_vici import acquire
from btns_vici import inetdiag as _inetdiag
from btns_vici.strongswan.enforce import XFRM_REQID
from btns_vici.xfrm import _wire as wire
from btns_vici.xfrm._records import EVENT_KINDS, XfrmPolicy

NEW_POLICY = next(num for num, kind in EVENT_KINDS.items() if kind == "new-policy")


def _decode(msg: bytes) -> XfrmPolicy:
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", msg)
    assert kind in (acquire.XFRM_MSG_NEWPOLICY, acquire.XFRM_MSG_UPDPOLICY)
    assert length == len(msg) and flags == acquire.NLM_F_REQUEST | acquire.NLM_F_ACK
    # Decoded as the kernel's own notification of the same policy would be.
    as_notification = struct.pack("=IHHII", length, NEW_POLICY, 0, 0, 0) + msg[16:]
    pol = wire.decode_message(as_notification)
    assert isinstance(pol, XfrmPolicy)
    return pol


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_trap_message_selects_exactly_the_mark_and_requires_esp_transport(family: int) -> None:
    mark = acquire.mark_for(0x1234_5678_9ABC_DEF0)
    pol = _decode(acquire.trap_message(acquire.XFRM_MSG_NEWPOLICY, family, mark, XFRM_REQID))
    assert pol.direction == "out" and pol.action == 0 and pol.priority == acquire.TRAP_PRIORITY == 0
    assert (pol.mark.value, pol.mark.mask) == (mark, 0xFFFFFFFF)
    assert pol.sel.family == family and pol.sel.prefixlen_s == pol.sel.prefixlen_d == 0  # any address
    (t,) = pol.templates
    assert (t.proto, t.mode, t.reqid, t.optional, t.family) == (50, 0, XFRM_REQID, False, family)
    upd = acquire.trap_message(acquire.XFRM_MSG_UPDPOLICY, family, mark, 7)
    assert struct.unpack_from("=H", upd, 4)[0] == acquire.XFRM_MSG_UPDPOLICY
    assert _decode(upd).templates[0].reqid == 7


def test_use_trap_is_optional_until_its_sa_is_up_then_required() -> None:
    """``btns:use``: the same trap, its template optional (the kernel raises the ACQUIRE but sends
    in clear), re-inserted required once the SA is up (the same selector and mark: an update)."""
    mark = acquire.mark_for(0x42)
    opt = _decode(acquire.trap_message(acquire.XFRM_MSG_NEWPOLICY, socket.AF_INET, mark, XFRM_REQID, True))
    (t,) = opt.templates
    assert (t.proto, t.mode, t.reqid, t.optional) == (50, 0, XFRM_REQID, True)
    req = _decode(acquire.trap_message(acquire.XFRM_MSG_UPDPOLICY, socket.AF_INET, mark, XFRM_REQID, False))
    assert (req.sel, req.mark, req.priority) == (opt.sel, opt.mark, opt.priority)
    assert req.templates[0].optional is False


def test_use_attempt_negotiates_the_demand_without_its_keyword() -> None:
    from btns_vici import PToken, Setting
    from btns_vici.core.requirements import USE_POLICY, is_opportunistic

    demand = PToken()
    demand.policy_name = USE_POLICY
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    plain = acquire.without_policy(demand)
    assert not is_opportunistic(plain) and plain.policy_name is None
    assert plain.privacy_protected == Setting.LEVEL_MEDIUM and demand.policy_name == USE_POLICY


def test_delete_names_the_trap_by_selector_direction_and_mark() -> None:
    msg = acquire.trap_message(acquire.XFRM_MSG_DELPOLICY, socket.AF_INET, 0x8000_0001, 0)
    body = msg[16:]
    sel, index, direction = wire.USERPOLICY_ID.unpack_from(body)
    assert (index, direction) == (0, 1) and sel == wire.encode_selector(socket.AF_INET)
    attrs = dict(wire.iter_attributes(body[wire.USERPOLICY_ID.size :]))
    assert struct.unpack("=II", attrs[acquire.XFRMA_MARK]) == (0x8000_0001, 0xFFFFFFFF)


def test_backstop_blocks_every_trap_mark_right_behind_the_traps() -> None:
    pol = _decode(acquire.backstop_message(acquire.XFRM_MSG_NEWPOLICY, socket.AF_INET))
    assert pol.direction == "out" and pol.action == 1 and pol.templates == ()  # XFRM_POLICY_BLOCK
    assert pol.priority == acquire.BACKSTOP_PRIORITY > acquire.TRAP_PRIORITY
    assert (pol.mark.value, pol.mark.mask) == (acquire.MARK_BIT, acquire.MARK_BIT)


def test_marks_carry_the_bit_and_the_low_cookie_bits() -> None:
    assert acquire.mark_for(0) == acquire.MARK_BIT
    assert acquire.mark_for(0xFFFF_FFFF_FFFF_FFFF) == 0xFFFF_FFFF
    assert acquire.mark_for(5) != acquire.mark_for(6)
    assert all(acquire.mark_for(c) & acquire.MARK_BIT for c in (1, 2**31, 2**40 + 3))


def test_sock_diag_mark_filter_bytecode() -> None:
    code = _inetdiag.mark_filter(acquire.MARK_BIT, acquire.MARK_BIT)
    op, yes, no, mark, mask = struct.unpack("=BBHII", code)
    assert (op, yes, no) == (_inetdiag.INET_DIAG_BC_MARK_COND, len(code), len(code) + 4)  # accept / reject
    assert (mark, mask) == (acquire.MARK_BIT, acquire.MARK_BIT)
    req = _inetdiag.request(socket.AF_INET, socket.IPPROTO_TCP, bytecode=code)
    assert len(req) == struct.unpack_from("=I", req)[0] == 16 + 56 + 4 + len(code)
    assert struct.unpack_from("=HH", req, 16 + 56) == (4 + len(code), _inetdiag.INET_DIAG_REQ_BYTECODE)


def test_a_wildcard_listeners_responder_connection_takes_any_of_our_addresses(tmp_path) -> None:
    """set_socket_pToken on a socket bound to 0.0.0.0 (then a plain listen) loads a responder
    connection for any local address: local_addrs %any, local_ts dynamic."""
    from btns_vici import AuthMethod, IToken, PToken, Setting
    from btns_vici.dataplane import XFRM
    from btns_vici.hostkey import load_or_create
    from btns_vici.strongswan.enforce import conn_config

    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.tunnel_mode = Setting.DISABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    host = load_or_create(tmp_path / "keys")
    (conn,) = conn_config("r", None, None, host, [host.public_der], p, XFRM).values()
    assert conn["local_addrs"] == ["%any"] and conn["remote_addrs"] == ["%any"]
    child = conn["children"]["r"]
    assert (child["local_ts"], child["remote_ts"], child["mode"]) == (["dynamic"], ["dynamic"], "transport")
