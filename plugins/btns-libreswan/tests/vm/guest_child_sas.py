"""CHILD SAs with pluto on a kernel with ESP: runs INSIDE the VM tier (scripts/vm/run.sh).

Not collected on the host (no ``test_`` prefix): test_lsw_vm.py boots the VM and runs
``pytest`` on this file there. Two plutos (btns_lab.libreswan.lab) bring up every conn with
its CHILD SA: the four tunnel-mode host-to-host conns of the lab plus ``tpc``, transport
mode with raw RSA keys on address pair 4. The backend must report the SAs as the kernel
has them, prove the data plane through XFRM, and fail closed when the SA goes away.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btns_lab.libreswan.lab import Lab, bring_up, build
from btns_lab.libreswan.runner import RsaKey, wait_for
from btns_vici import knownpeers, netns, plugins
from btns_vici.backend import Backend
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.derive import ptoken_for
from btns_vici.core.selectors import Flow
from btns_vici.core.tokens import IToken, PToken
from btns_vici.sockets import flow_of

pytestmark = [pytest.mark.vm, pytest.mark.libreswan]

UP = ("nullc", "rsac", "tpc")
# qemu TCG is slow: ECDH instead of MODP2048, the smallest RSA keys pluto makes, patient retransmits
FAST = "\tike=aes_gcm256-sha2_256;dh19\n\tretransmit-interval=2000\n"
KEY_DIR = tempfile.mkdtemp(prefix="btns-lsw-vm-keys-")  # the known-peers store of these tests (NULL peers)
MODULES = ("xfrm_user", "esp4", "esp6", "ah4", "xfrm4_tunnel", "tunnel4", "xfrm_ipcomp", "veth")


def tpc(side: str, key_me: RsaKey, key_peer: RsaKey) -> str:
    me, peer = (1, 2) if side == "a" else (2, 1)
    return f"""
conn tpc
\tleft=10.231.4.{me}
\tright=10.231.4.{peer}
\ttype=transport
\tauthby=rsasig
\tleftid=@tp-{side}
\trightid=@tp-{"b" if side == "a" else "a"}
\tleftrsasigkey={key_me.rsasigkey}
\trightrsasigkey={key_peer.rsasigkey}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.environ.get("BTNS_VM_GUEST") != "1":
        pytest.fail("guest_child_sas.py runs inside the VM only (BTNS_VM_GUEST=1)")
    subprocess.run(["modprobe", "-a", *MODULES], check=True)
    work = Path(tempfile.mkdtemp(prefix="btns-lsw-vm-"))
    the_lab = build(secrets.token_hex(2), work, extra_conns=tpc, pairs=6, defaults=FAST, bits=2192)
    try:
        up = bring_up(the_lab, UP, timeout=60)
        assert sorted(up) == sorted(UP), the_lab.a.tail()

        def children_up() -> bool:
            sas = {sa.name: sa for sa in backend(the_lab, "a").list_sas()}
            return all(n in sas and len(sas[n].children) == 1 for n in UP)

        assert wait_for(children_up, 60, 0.5), the_lab.a.tail()
        yield the_lab
    finally:
        the_lab.pair.teardown()
        shutil.rmtree(work, ignore_errors=True)


def backend(lab: Lab, side: str) -> Backend:
    p = lab.a if side == "a" else lab.b
    opts = {"pluto_ctl": str(p.ctl), "netns": p.netns, "ike": "aes_gcm256-sha2_256;dh19", "timeout": "90"}
    opts["key_dir"] = os.path.join(KEY_DIR, side)
    return plugins.get_backend("libreswan", opts)


def flow(pair: int, port: int = 80) -> Flow:
    return Flow(6, ipaddress.ip_address(f"10.231.{pair}.1"), 40000, ipaddress.ip_address(f"10.231.{pair}.2"), port)


def test_every_conn_has_an_installed_child_sa(lab: Lab) -> None:
    sas = {sa.name: sa for sa in backend(lab, "a").list_sas()}
    for name in UP:
        (child,) = sas[name].children
        assert child.installed and child.protocol == "ESP" and child.spi_in and child.spi_out
        assert child.encr_alg == "AES_GCM_16" and child.encr_keysize == 256 and child.integ_alg is None
        assert child.mode == ("TRANSPORT" if name == "tpc" else "TUNNEL")


def test_spis_agree_between_the_two_plutos(lab: Lab) -> None:
    a = {sa.name: sa for sa in backend(lab, "a").list_sas()}
    b = {sa.name: sa for sa in backend(lab, "b").list_sas()}
    for name in UP:
        assert a[name].children[0].spi_out == b[name].children[0].spi_in
        assert a[name].children[0].spi_in == b[name].children[0].spi_out


def test_transport_raw_key_flow_is_protected_with_proof_and_ptoken(lab: Lab) -> None:
    prot = backend(lab, "a").find_protection(flow(4))
    assert prot is not None and prot.ike_sa.name == "tpc"
    assert prot.proof.dataplane == "kernel-xfrm" and prot.proof.reqid
    tok = ptoken_for(prot)
    assert tok.tunnel_mode is Setting.DISABLE and tok.privacy_protected is Setting.LEVEL_HIGH
    peer = tok.itoken
    assert peer is not None and peer.authentication_method is AuthMethod.BTNS
    assert peer.pub_key_id == base64.b64decode(lab.key_b.pubkey)


def test_null_auth_tunnel_flow(lab: Lab) -> None:
    prot = backend(lab, "a").find_protection(flow(0, 443))
    assert prot is not None and prot.ike_sa.name == "nullc"
    tok = ptoken_for(prot)
    assert tok.tunnel_mode is Setting.ENABLE
    assert tok.itoken is not None and tok.itoken.authentication_method is AuthMethod.BTNS
    assert tok.itoken.pub_key_id is None and tok.itoken.channel_binding is None
    # NULL auth leaves nothing to pin: the known-peers record says which session this is instead.
    assert prot.ike_sa.extra["null_peer"] == knownpeers.SAME_SESSION  # the fixture saw this IKE SA first
    assert "peer_record=" in (tok.audit_string or "") and "same-session: null-auth 10.231.0.2" in tok.audit_string
    rec = knownpeers.KnownPeers(os.path.join(KEY_DIR, "a")).get_null("10.231.0.2")
    assert rec is not None and rec.sessions == 1 and rec.ike_id == "ID_NULL"


ECHO_SERVER = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.231.0.2', 5001)); "
    "s.settimeout(60); d, a = s.recvfrom(2048); s.sendto(d, a)"
)
ECHO_CLIENT = (
    "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
    "for _ in range(20):\n"
    "    s.sendto(b'x' * 1000, ('10.231.0.2', 5001))\n"
    "    try:\n        assert s.recv(2048) == b'x' * 1000; break\n"
    "    except TimeoutError:\n        continue\n"
    "else:\n    raise SystemExit('no echo')"
)


def test_traffic_is_counted(lab: Lab) -> None:
    server = subprocess.Popen(["ip", "netns", "exec", lab.b.netns, sys.executable, "-c", ECHO_SERVER])
    try:
        time.sleep(1)
        subprocess.run(["ip", "netns", "exec", lab.a.netns, sys.executable, "-c", ECHO_CLIENT], check=True, timeout=60)
    finally:
        server.wait(60)
    sa = {s.name: s for s in backend(lab, "a").list_sas()}["nullc"]
    assert sa.children[0].bytes_out >= 1000 and sa.children[0].bytes_in >= 1000


def test_unprotected_flow_and_terminated_sa_fail_closed(lab: Lab) -> None:
    b = backend(lab, "a")
    outside = Flow(6, ipaddress.ip_address("10.231.4.1"), 40000, ipaddress.ip_address("10.231.9.9"), 80)
    assert b.find_protection(outside) is None
    lab.a.whack("--terminate", "--name", "tpc")
    assert wait_for(lambda: b.find_protection(flow(4)) is None, 10)


TCP_ECHO = (
    "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('10.231.5.2', 5002)); s.listen(); s.settimeout(120); c, _ = s.accept(); c.sendall(c.recv(4096))"
)


def test_set_socket_ptoken_null_auth_end_to_end(lab: Lab) -> None:
    """serve + establish build RFC 7619 NULL-auth transport conns; the guarded socket talks through ESP."""
    want = PToken()
    want.privacy_protected = Setting.LEVEL_HIGH
    want.tunnel_mode = Setting.DISABLE
    it = IToken()
    it.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    want.itoken = it
    a, b = backend(lab, "a"), backend(lab, "b")
    assert b.serve(ipaddress.ip_address("10.231.5.2"), want).startswith("btns-resp-")
    server = subprocess.Popen(["ip", "netns", "exec", lab.b.netns, sys.executable, "-c", TCP_ECHO])
    try:
        time.sleep(1)
        name = a.establish(
            Flow(6, ipaddress.ip_address("10.231.5.1"), 0, ipaddress.ip_address("10.231.5.2"), 5002), want
        )
        with netns.entered(lab.a.netns):
            sock = socket.socket()
        with sock:
            how = a.enforce(sock, want)
            assert "ESP required" in how.dataplane_guard
            sock.settimeout(30)
            sock.connect(("10.231.5.2", 5002))
            sock.sendall(b"btns" * 100)
            assert sock.recv(4096) == b"btns" * 100
            prot = a.find_protection(flow_of(sock))
            assert prot is not None and prot.ike_sa.name == name and prot.proof.dataplane == "kernel-xfrm"
            got = ptoken_for(prot)
            assert got.tunnel_mode is Setting.DISABLE and got.privacy_protected is Setting.LEVEL_HIGH
            assert got.itoken is not None and got.itoken.authentication_method is AuthMethod.BTNS
            assert got.itoken.pub_key_id is None
        server.wait(30)
    finally:
        if server.poll() is None:  # only on failure: the echo server ends after one exchange
            server.kill()
            server.wait()
