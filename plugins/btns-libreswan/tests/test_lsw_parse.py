"""Parsing whack output into normalized records: real pluto 4.10 captures and 5.x formats.

tests/data/libreswan-4.10/ was captured from pluto 4.10 on this host by
scripts/capture-whack-output.py (IKE SAs only: this kernel has no ESP).
tests/data/libreswan-5.3/ comes from libreswan's own v5.3 test suite results
(testing/pluto/ikev2-29-no-rekey, ikev2-asymmetric-04-null-rsaraw, newoe-27) with the
suite's sanitized SPIs/timers replaced by values; the 5.x lines were checked against
programs/pluto/whack_showstates.c, whack_trafficstatus.c and keys.c of v5.3.
"""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest

from btns_libreswan import ipsecconf
from btns_libreswan.normalize import auth_method, ike_sas
from btns_libreswan.parse import (
    parse_listpubkeys,
    parse_selectors,
    parse_showstates,
    parse_status,
    parse_trafficstatus,
    split_encr,
)
from btns_libreswan.rsakey import spki_from_rsasigkey
from btns_vici.core.constants import AuthMethod
from btns_vici.core.derive import channel_binding, itoken_for
from btns_vici.core.errors import ProtocolError
from btns_vici.core.records import IkeSA
from btns_vici.core.selectors import Flow, TrafficSelector

V4 = Path(__file__).parent / "data" / "libreswan-4.10"
V5 = Path(__file__).parent / "data" / "libreswan-5.3"


def _read(d: Path, name: str) -> str:
    return (d / name).read_text()


def sas_410(side: str) -> dict[str, IkeSA]:
    sas = ike_sas(
        parse_status(_read(V4, f"{side}-status.txt")),
        parse_showstates(_read(V4, f"{side}-showstates.txt")),
        parse_trafficstatus(_read(V4, f"{side}-trafficstatus.txt")),
        ipsecconf.load(str(V4 / f"{side}-ipsec.conf")),
        parse_listpubkeys(_read(V4, f"{side}-listpubkeys.txt")),
    )
    return {sa.name: sa for sa in sas}


def conf_key(side: str, which: str) -> bytes:
    """The raw key the 4.10 capture configured: ``which`` = left|right of ``side``'s rsac."""
    for line in _read(V4, f"{side}-ipsec.conf").splitlines():
        if line.strip().startswith(f"{which}rsasigkey="):
            return spki_from_rsasigkey(line.split("=", 1)[1])
    raise AssertionError("no key in capture")


# --- libreswan 4.10, captured ------------------------------------------------------------------


def test_410_initiator_sees_every_ike_sa_established() -> None:
    sas = sas_410("a")
    assert sorted(sas) == ["anyc", "nullc", "pskc", "rsac"]
    for sa in sas.values():
        assert sa.backend == "libreswan" and sa.version == 2 and sa.is_established
        assert sa.encr_alg == "AES_GCM_16" and sa.extra["ike_encr_keysize"] == "256"
        assert sa.prf_alg == "HMAC_SHA2_512" and sa.dh_group == "MODP2048"
        assert sa.children == ()  # CHILD SAs cannot be installed on this kernel (no ESP)


def test_410_null_auth_is_btns_without_key_or_channel_binding() -> None:
    sa = sas_410("a")["nullc"]
    assert (sa.local_host, sa.remote_host) == (ipaddress.ip_address("10.231.0.1"), ipaddress.ip_address("10.231.0.2"))
    for ident in (sa.local, sa.remote):
        assert ident.auth_method is AuthMethod.BTNS
        assert ident.ike_id == "ID_NULL" and ident.public_key is None and ident.auth_class == "null"
    assert channel_binding(sa.remote) is None


def test_410_psk_is_presharedkey_with_the_peer_id() -> None:
    sa = sas_410("a")["pskc"]
    assert sa.remote.auth_method is AuthMethod.PRESHAREDKEY and sa.remote.ike_id == "@psk-b"
    assert sa.local.auth_method is AuthMethod.PRESHAREDKEY and sa.local.ike_id == "@psk-a"
    assert sa.remote.public_key is None
    assert (channel_binding(sa.remote) or "").startswith("btns-cb-v1:psk-id-sha256:")


def test_410_raw_rsa_keys_are_spki_of_the_configured_keys_on_both_sides() -> None:
    a, b = sas_410("a")["rsac"], sas_410("b")["rsac"]
    assert a.remote.auth_method is AuthMethod.BTNS and a.remote.ike_id == "@rsa-b"
    assert a.remote.public_key == conf_key("a", "right") == conf_key("b", "left")
    assert a.local.public_key == conf_key("a", "left")
    assert b.remote.public_key == a.local.public_key and b.local.public_key == a.remote.public_key
    assert a.remote.public_key is not None and a.remote.public_key[:2] == b"\x30\x82"
    tok = itoken_for(a.remote)
    assert tok is not None and channel_binding(a.remote) == channel_binding(b.local)


def test_410_responder_instance_of_a_template() -> None:
    sas = sas_410("b")
    assert "anyc[1]" in sas
    sa = sas["anyc[1]"]
    assert sa.remote_host == ipaddress.ip_address("10.231.3.1") and sa.remote.auth_method is AuthMethod.BTNS


def test_410_key_not_listed_by_pluto_is_dropped() -> None:
    status = parse_status(_read(V4, "a-status.txt"))
    states = parse_showstates(_read(V4, "a-showstates.txt"))
    keys = ipsecconf.load(str(V4 / "a-ipsec.conf"))
    sas = {s.name: s for s in ike_sas(status, states, {}, keys, {"@rsa-b": {"AwEAAXXXX"}})}
    assert sas["rsac"].remote.public_key is None  # configured key and pluto's key id disagree
    assert sas["rsac"].local.public_key is None  # pluto lists no key at all for @rsa-a


def test_410_status_knows_its_config_file_and_version() -> None:
    st = parse_status(_read(V4, "a-status.txt"))
    assert st.version == "4.10" and st.configfile is not None and st.configfile.endswith("/a/ipsec.conf")
    assert set(st.states) == set(parse_showstates(_read(V4, "a-showstates.txt")))


# --- libreswan 5.x format -------------------------------------------------------------------------


def test_5x_subnet_tunnel_with_child_sa() -> None:
    (sa,) = ike_sas(parse_status(_read(V5, "west-status.txt")))
    assert sa.name == "westnet-eastnet-ikev2" and sa.is_established and sa.version == 2
    assert str(sa.local_host) == "192.1.2.45" and str(sa.remote_host) == "192.1.2.23"
    assert sa.remote.ike_id == "@east" and sa.remote.auth_method is AuthMethod.BTNS
    assert sa.remote.public_key is None  # no config given: the key is unknown, never guessed
    (child,) = sa.children
    assert child.installed and child.mode == "TUNNEL" and child.protocol == "ESP"
    assert (child.spi_out, child.spi_in) == (0xC1D2E3F4, 0xA1B2C3D4)
    assert (child.encr_alg, child.encr_keysize, child.integ_alg) == ("AES_GCM_16", 256, None)
    flow = Flow(6, ipaddress.ip_address("192.0.1.7"), 1234, ipaddress.ip_address("192.0.2.9"), 80)
    assert sa.child_for(flow) is child
    outside = Flow(6, ipaddress.ip_address("192.0.1.7"), 1234, ipaddress.ip_address("192.0.3.9"), 80)
    assert sa.child_for(outside) is None


def test_5x_asymmetric_null_peer_and_own_raw_key() -> None:
    (sa,) = ike_sas(
        parse_status(_read(V5, "east-status.txt")),
        None,
        parse_trafficstatus(_read(V5, "east-trafficstatus.txt")),
        ipsecconf.load(str(V5 / "east-ipsec.conf")),
        parse_listpubkeys(_read(V5, "east-listpubkeys.txt")),
    )
    assert sa.remote.auth_method is AuthMethod.BTNS and sa.remote.ike_id == "ID_NULL"
    assert sa.remote.public_key is None
    assert sa.local.auth_method is AuthMethod.BTNS and sa.local.ike_id == "@east"
    rsasigkey = next(
        line.split("=", 1)[1] for line in _read(V5, "east-ipsec.conf").splitlines() if "rightrsasigkey=" in line
    )
    assert sa.local.public_key == spki_from_rsasigkey(rsasigkey)
    (child,) = sa.children
    assert (child.bytes_in, child.bytes_out) == (84, 84)
    assert (child.spi_out, child.spi_in) == (0x9E2B4F01, 0xAD13E7C2)


def test_5x_showstates_instances_tcp_and_ipcomp() -> None:
    states = parse_showstates(_read(V5, "oe-showstates.txt"))
    assert states[1].conn_key == "private-or-clear#192.1.2.0/24[1]" and states[1].parent is None
    assert states[2].parent == 1 and states[3].parent == 1
    assert ("comp", 0x5E1F, "192.1.2.23") in states[3].saids
    assert [s[0] for s in states[2].saids] == ["esp", "esp", "tun", "tun"]


def test_5x_trafficstatus() -> None:
    t = parse_trafficstatus(_read(V5, "oe-trafficstatus.txt"))
    assert t[2].conn_key == "private-or-clear#192.1.2.0/24[1]"
    assert t[2].peer_id == "ID_NULL" and t[2].count("inBytes") == 168 and t[3].count("outBytes") == 84


# --- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", TrafficSelector.from_network("10.0.0.1/32")),
        ("192.0.2.0/24", TrafficSelector.from_network("192.0.2.0/24")),
        ("{192.0.2.1/32}", TrafficSelector.from_network("192.0.2.1/32")),
        ("192.0.2.0/24:tcp/80", TrafficSelector.from_network("192.0.2.0/24", 6, 80, 80)),
        ("192.0.2.0/24:udp/0-65535", TrafficSelector.from_network("192.0.2.0/24", 17)),
        ("192.0.2.0/24/TCP/443", TrafficSelector.from_network("192.0.2.0/24", 6, 443, 443)),
        ("192.0.2.0/24/UDP", TrafficSelector.from_network("192.0.2.0/24", 17)),
        ("2001:db8::/64:tcp/22", TrafficSelector.from_network("2001:db8::/64", 6, 22, 22)),
        ("192.0.2.1-192.0.2.9", TrafficSelector(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.9"))),
    ],
)
def test_selectors(text: str, expected: TrafficSelector) -> None:
    assert parse_selectors(text, "10.0.0.1") == (expected,)


def test_encr_names() -> None:
    assert split_encr("AES_CBC_128") == ("AES_CBC", 128)
    assert split_encr("3DES_CBC_192") == ("3DES_CBC", 192)
    assert split_encr("AES_GCM_16") == ("AES_GCM_16", None)
    assert split_encr("CHACHA20_POLY1305") == ("CHACHA20_POLY1305", 256)
    assert split_encr("NONE") == (None, None)


@pytest.mark.parametrize(
    ("word", "idtype", "method"),
    [
        ("null", "ID_NULL", AuthMethod.BTNS),
        ("secret", "ID_FQDN", AuthMethod.PRESHAREDKEY),
        ("rsasig(RSASIG+RSASIG_v1_5)", "FQDN", AuthMethod.BTNS),
        ("RSASIG+ECDSA+RSASIG_v1_5", "ID_DER_ASN1_DN", AuthMethod.PKIX_TRUSTED),
        ("RSASIG+AUTH_NULL+RSASIG_v1_5", "DER_ASN1_DN", AuthMethod.BTNS),  # weakest accepted
        ("eaponly", "ID_FQDN", AuthMethod.EAP),
        ("never", "ID_FQDN", AuthMethod.NONE),
    ],
)
def test_auth_words(word: str, idtype: str, method: AuthMethod) -> None:
    assert auth_method(word, idtype) is method


# --- garbage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world\n", "000 random line\n", "<html>\n"])
def test_garbage_status_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_status(text)
    assert exc.value.errno == errno.EPROTO and "Connection list" in str(exc.value)


def test_garbage_showstates_and_traffic_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="showstates"):
        parse_showstates("000 #1: fine\nnot a state line\n")
    with pytest.raises(ProtocolError, match="trafficstatus"):
        parse_trafficstatus("#2 garbage without quotes\n")
    with pytest.raises(ProtocolError, match="listpubkeys"):
        parse_listpubkeys("something else entirely\n")


def test_empty_outputs_mean_no_sas() -> None:
    assert parse_showstates("") == {} and parse_trafficstatus("") == {} and parse_listpubkeys("") == {}
    status = parse_status("000 Connection list:\n000  \n")
    assert ike_sas(status) == []


def test_bad_selector_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_selectors("192.0.2.0/24:nosuchproto/1", "10.0.0.1")
