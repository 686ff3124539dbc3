"""strongSwan enforcement on kernel-xfrm: the library's CHILD_SAs and the guard share one static reqid.

The kernel's outbound SA lookup for a per-socket policy template matches the reqid exactly
(0 is no wildcard there), so the guard's templates and charon's SAs must carry the same one
(exercised for real in tests/vm/test_enforce_xfrm_vm.py).
"""

from __future__ import annotations

import ipaddress

from btns_vici import AuthMethod, IToken, PToken, Setting
from btns_vici.dataplane import LIBIPSEC, XFRM
from btns_vici.hostkey import load_or_create
from btns_vici.strongswan.conns import XFRM_REQID, conn_config


def _demand(tunnel: Setting) -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.tunnel_mode = tunnel
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    return p


def test_xfrm_children_carry_the_static_reqid_libipsec_ones_do_not(tmp_path) -> None:
    host = load_or_create(tmp_path / "keys")
    a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    for remote in (b, None):  # initiator and responder
        (conn,) = conn_config("x", a, remote, host, [host.public_der], _demand(Setting.DISABLE), XFRM).values()
        child = conn["children"]["x"]
        assert (child["mode"], child["reqid"]) == ("transport", str(XFRM_REQID))
        (conn,) = conn_config("x", a, remote, host, [host.public_der], _demand(Setting.ENABLE), LIBIPSEC).values()
        assert "reqid" not in conn["children"]["x"]
    assert 0 < XFRM_REQID < 2**32
