"""The libreswan backend against two real plutos (4.10) in btns-lsw-* namespaces, IKE level.

CHILD SAs cannot be installed on this kernel (no ESP), so these tests check IKE SAs,
identities, keys and the fail-closed answers; tests/vm/ checks CHILD SAs in the VM tier.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Iterator

import pytest

from btns_lab.libreswan.lab import Lab, established
from btns_lab.libreswan.runner import wait_for
from btns_vici import plugins
from btns_vici.backend import Backend, SAEvent
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.derive import channel_binding
from btns_vici.core.errors import BackendError, BtnsError, NotSupportedError
from btns_vici.core.records import IkeSA
from btns_vici.core.selectors import Flow
from btns_vici.core.tokens import IToken, PToken

pytestmark = pytest.mark.libreswan


def backend(lab_pluto_ctl: str) -> Backend:
    return plugins.get_backend("libreswan", {"pluto_ctl": lab_pluto_ctl})


def by_name(sas: list[IkeSA]) -> dict[str, IkeSA]:
    return {sa.name: sa for sa in sas}


def test_entry_point_registers_the_backend() -> None:
    names = [b.name for b in plugins.backends()]
    assert "libreswan" in names
    assert plugins.get_plugin_manager().get_plugin("libreswan") is not None


def test_list_sas_initiator(lab: Lab) -> None:
    sas = by_name(backend(str(lab.a.ctl)).list_sas())
    assert {"nullc", "pskc", "rsac", "anyc"} <= set(sas)
    assert all(sa.backend == "libreswan" and sa.is_established and sa.version == 2 for sa in sas.values())
    null = sas["nullc"]
    assert null.remote.auth_method is AuthMethod.BTNS and null.remote.ike_id == "ID_NULL"
    assert null.remote.public_key is None and channel_binding(null.remote) is None
    assert null.remote_host == ipaddress.ip_address("10.231.0.2")
    psk = sas["pskc"]
    assert psk.remote.auth_method is AuthMethod.PRESHAREDKEY and psk.remote.ike_id == "@psk-b"
    rsa = sas["rsac"]
    assert rsa.remote.auth_method is AuthMethod.BTNS and rsa.remote.ike_id == "@rsa-b"
    assert rsa.remote.public_key == base64.b64decode(lab.key_b.pubkey)  # showhostkey's own SPKI
    assert rsa.local.public_key == base64.b64decode(lab.key_a.pubkey)


def test_list_sas_responder_and_template_instance(lab: Lab) -> None:
    sas = by_name(backend(str(lab.b.ctl)).list_sas())
    assert sas["rsac"].remote.public_key == base64.b64decode(lab.key_a.pubkey)
    assert sas["pskc"].remote.ike_id == "@psk-a"
    inst = [sa for name, sa in sas.items() if name.startswith("anyc[")]
    assert len(inst) == 1 and inst[0].remote_host == ipaddress.ip_address("10.231.3.1")
    assert inst[0].remote.auth_method is AuthMethod.BTNS


def test_env_selection(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BTNS_BACKEND", "libreswan")
    monkeypatch.setenv("BTNS_PLUTO_CTL", str(lab.a.ctl))
    b = plugins.get_backend()
    assert b.name == "libreswan" and b.probe()
    assert "rsac" in by_name(b.list_sas())


def test_capabilities(lab: Lab) -> None:
    caps = backend(str(lab.a.ctl)).capabilities()
    assert caps.dataplane == "kernel-xfrm" and AuthMethod.BTNS in caps.auth_methods
    assert caps.enforce is True


def test_no_child_sa_means_unprotected(lab: Lab) -> None:
    b = backend(str(lab.a.ctl))
    flow = Flow(6, ipaddress.ip_address("10.231.2.1"), 40000, ipaddress.ip_address("10.231.2.2"), 80)
    assert b.find_sa(flow) is None and b.find_protection(flow) is None


def demand(*methods: AuthMethod, privacy: Setting = Setting.ANY) -> PToken:
    """A pToken template enabling exactly ``methods`` (none: any method)."""
    tok = PToken()
    tok.privacy_protected = privacy
    if methods:
        it = IToken()
        for m in methods:
            it.set_auth_method(m, Setting.ENABLE)
        tok.itoken = it
    return tok


def test_enforce_refuses_what_it_cannot_build(lab: Lab) -> None:
    b = backend(str(lab.a.ctl))
    with socket.socket() as s:
        for bad in (demand(AuthMethod.PKIX_TRUSTED), demand(AuthMethod.PRESHAREDKEY), demand(privacy=Setting.DISABLE)):
            with pytest.raises(NotSupportedError) as exc:
                b.enforce(s, bad)
            assert exc.value.errno == errno.EOPNOTSUPP


def test_enforce_arms_a_fail_closed_socket_guard(lab: Lab) -> None:
    b = backend(str(lab.a.ctl))
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        how = b.enforce(client, demand(AuthMethod.BTNS))
        assert "ESP required" in how.dataplane_guard
        client.settimeout(3)
        with pytest.raises(OSError) as exc:  # no ESP SA (and no ESP in this kernel): never in clear
            client.connect(server.getsockname())
        assert exc.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def test_establish_null_auth_reaches_ike_but_fails_closed_here(lab: Lab) -> None:
    """serve on b, establish from a (RFC 7619 NULL auth, transport): IKE up, CHILD SA impossible here."""
    a, b = backend(str(lab.a.ctl)), backend(str(lab.b.ctl))
    want = demand(AuthMethod.BTNS)
    resp = b.serve(ipaddress.ip_address("10.231.4.2"), want)
    assert resp.startswith("btns-resp-")
    flow = Flow(6, ipaddress.ip_address("10.231.4.1"), 0, ipaddress.ip_address("10.231.4.2"), 7)
    with pytest.raises(BtnsError) as exc:
        a.establish(flow, want)
    assert exc.value.errno == errno.EHOSTUNREACH
    ike = [sa for sa in a.list_sas() if sa.name.startswith("btns-init-")]
    assert ike and ike[0].is_established and ike[0].remote.auth_method is AuthMethod.BTNS
    assert ike[0].remote.ike_id == "ID_NULL" and ike[0].children == ()


def test_daemon_down_is_econnrefused(tmp_path: os.PathLike[str]) -> None:
    b = backend(os.path.join(str(tmp_path), "nowhere.ctl"))
    assert b.probe() is False
    with pytest.raises(BackendError) as exc:
        b.list_sas()
    assert exc.value.errno == errno.ECONNREFUSED


def test_whack_timing(lab: Lab) -> None:
    b = backend(str(lab.a.ctl))
    t0 = time.monotonic()
    for _ in range(5):
        b.list_sas()
    per_call = (time.monotonic() - t0) / 5
    assert per_call < 0.5, f"list_sas took {per_call * 1000:.0f} ms"


@pytest.fixture
def events(lab: Lab) -> Iterator[list[SAEvent]]:
    got: list[SAEvent] = []
    stop = plugins.get_backend("libreswan", {"pluto_ctl": str(lab.a.ctl), "poll_interval": "0.1"}).watch(got.append)
    yield got
    stop()


def test_watch_sees_ike_sa_go_down_and_up(lab: Lab, events: list[SAEvent]) -> None:
    lab.a.whack("--terminate", "--name", "pskc")
    assert wait_for(lambda: any(e.kind == "ike-down" and e.ike_name == "pskc" for e in events), 10)
    lab.a.whack("--initiate", "--name", "pskc", "--asynchronous")
    assert wait_for(lambda: any(e.kind == "ike-up" and e.ike_name == "pskc" for e in events), 10)
    assert wait_for(lambda: established(lab.b, "pskc"), 10)
