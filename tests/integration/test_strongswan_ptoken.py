"""get_socket_pToken (draft 2.3.3) on real CHILD_SAs between the two testbed namespaces.

Every auth mode (BTNS raw keys, PSK, X.509 from a test CA), IPv4 and IPv6, TCP and UDP.
"""

from __future__ import annotations

import hashlib
import socket

import pytest

from btns_lab.testbed import Testbed
from btns_vici.api import get_socket_ptoken
from btns_vici.core.constants import Attr, AuthMethod, Setting

from .conftest import AUTHS, FAMILIES, PROTOS, protected_ptoken

pytestmark = pytest.mark.testbed

EXPECTED_METHOD = {
    "rawkey": AuthMethod.BTNS,
    "psk": AuthMethod.PRESHAREDKEY,
    "x509": AuthMethod.PKIX_TRUSTED,
}


def _check_identity(tok, tb: Testbed, auth: str, peer) -> None:
    """An iToken names ``peer`` as authenticated by ``auth`` (draft 2.1.2 attributes)."""
    assert tok is not None
    assert tok.authentication_method == EXPECTED_METHOD[auth]
    assert tok.get_attr(Attr(EXPECTED_METHOD[auth])) == Setting.ENABLE
    if auth == "psk":
        assert tok.pub_key_id is None
        assert tok.channel_binding.startswith("btns-cb-v2:endpoints-sha256:")  # both ends' identities
        assert "peer-key-binding btns-cb-v1:psk-id-sha256:" in tok.audit_string
        return
    assert tok.pub_key_id == peer.key.public_der
    # channelBinding is the connection's (both ends' identities); the one-sided peer-key value is in auditString.
    assert tok.channel_binding.startswith("btns-cb-v2:endpoints-sha256:")
    assert "peer-key-binding btns-cb-v1:spki-sha256:" + hashlib.sha256(peer.key.public_der).hexdigest() in (
        tok.audit_string
    )
    if auth == "x509":
        assert tok.certificate_dn == f"CN=host-{peer.name}.btns.test"
        assert tok.certificate_authority_dn == f"CN=BTNS Test CA {tb.tag}"
    else:
        assert tok.certificate_dn is None and tok.certificate_authority_dn is None


@pytest.mark.parametrize("proto", list(PROTOS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("auth", AUTHS)
def test_protected_socket_ptoken(tb, backend_a, backend_b, pair_factory, auth, family, proto):
    name = f"{auth}{family}"
    tb.up(name, auth, family)
    sa, sb = pair_factory(PROTOS[proto], family)
    pa, pb = protected_ptoken(tb, backend_a, sa), protected_ptoken(tb, backend_b, sb)
    for tok, me, peer in ((pa, tb.a, tb.b), (pb, tb.b, tb.a)):
        assert tok.privacy_protected == Setting.LEVEL_HIGH  # ChaCha20-Poly1305
        assert tok.integrity_protected == Setting.LEVEL_HIGH
        assert tok.tunnel_mode == Setting.ENABLE  # kernel-libipsec: tunnel mode only
        assert tok.compression_available == Setting.DISABLE
        assert tok.ipoptions_protected == Setting.ENABLE
        assert tok.policy_name == f"{name}/host"
        assert "spi_in=" in tok.audit_string and "dataplane=kernel-libipsec" in tok.audit_string
        assert "kernel-libipsec" in tok.information_string and "ipsec0" in tok.information_string
        assert tok.protected
        _check_identity(tok.itoken, tb, auth, peer)
        _check_identity(tok.remote_itoken, tb, auth, me)
    # Both ends agree: what A sees as its peer is what B showed, and vice versa.
    assert pa.itoken.equivalent(pb.remote_itoken)
    assert pb.itoken.equivalent(pa.remote_itoken)
    if auth != "psk":  # PSK iTokens carry no key: both ends' differ only in auditString (the IKE identity),
        assert not pa.itoken.equivalent(pa.remote_itoken)  # channelBinding being the connection's, equal
    # The SA's selectors: A's local TS is B's remote TS.
    assert set(pa.local_ts) == set(pb.remote_ts) and set(pa.remote_ts) == set(pb.local_ts)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("auth", AUTHS)
def test_unprotected_socket_beside_protected(tb, backend_a, pair_factory, auth, family):
    """Only TCP to B's host address, port 24444, is covered: other sockets get DISABLE, no iToken."""
    bits = 32 if family == 4 else 128
    a, b = tb.a.addr(family), tb.b.addr(family)
    tb.up(f"only-{auth}", auth, family, children={"host": ([f"{a}/{bits}[tcp]"], [f"{b}/{bits}[tcp/24444]"])})
    prot, _ = pair_factory(socket.IPPROTO_TCP, family, 24444)
    plain_tcp, _ = pair_factory(socket.IPPROTO_TCP, family, 24444, plain=True)
    plain_udp, _ = pair_factory(socket.IPPROTO_UDP, family, 0, plain=True)
    p = protected_ptoken(tb, backend_a, prot)
    assert p.privacy_protected == Setting.LEVEL_HIGH and p.itoken is not None
    assert [str(t) for t in p.remote_ts] == [f"{b}/{bits}[6/24444]"]
    for s in (plain_tcp, plain_udp):
        u = get_socket_ptoken(s, backend_a)
        assert u.privacy_protected == Setting.DISABLE and u.integrity_protected == Setting.DISABLE
        assert u.tunnel_mode == Setting.DISABLE
        assert u.itoken is None and u.remote_itoken is None
        assert not u.protected
        assert "NOT protected" in u.information_string
    # Protected and unprotected answers side by side, repeatedly: no cross-talk.
    for _ in range(3):
        assert get_socket_ptoken(prot, backend_a).equivalent(p)
        assert not get_socket_ptoken(plain_tcp, backend_a).protected


def test_protection_levels_follow_algorithms(tb, backend_a, pair_factory):
    tb.up("cbc", "psk", 4, esp="aes128-sha256")
    s, _ = pair_factory(socket.IPPROTO_TCP, 4)
    p = protected_ptoken(tb, backend_a, s)
    assert p.privacy_protected == Setting.LEVEL_MEDIUM  # AES-128
    assert p.integrity_protected == Setting.LEVEL_MEDIUM  # HMAC-SHA2-256-128
    assert "AES_CBC-128/HMAC_SHA2_256_128" in p.information_string
