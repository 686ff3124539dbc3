"""Two charons (kernel-netlink, transport mode) in the VM: what VICI reports is what the kernel holds.

* A per-socket policy makes the kernel send an ACQUIRE; charon's trap (reqid 42, no global
  policies of its own) negotiates the CHILD_SA; the connection then flows through ESP and the
  state's counters rise. Before the SA exists the connection fails; it never goes out in clear.
* With charon's own policies, ``btns_vici.xfrm.prove_flow`` proves the flow is carried by the
  CHILD_SA that list-sas reports, and stops proving it once the kernel SA is gone.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from pathlib import Path

import pytest

from btns_vici import xfrm
from btns_vici.core.constants import AuthMethod
from btns_vici.core.records import ChildSA, Identity, IkeSA
from btns_vici.core.selectors import Flow, TrafficSelector

from ..integration.xfrm_support import ip, parse_ip_xfrm, socket_in, view
from .charon import charon, child_sas, load_psk_conn
from .netpair import A, B, sniffer, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ipsec_kernel")]

REQID = 42


def connect_with_policy(na: str, server: socket.socket, deadline: float) -> tuple[socket.socket, list[int]]:
    """Connect a socket carrying an ESP socket policy, retrying while the kernel says EAGAIN."""
    errors = []
    while time.monotonic() < deadline:
        client = socket_in(na, socket.AF_INET, socket.SOCK_STREAM)
        xfrm.set_socket_policy(client, "out", ["esp"], reqid=REQID)
        xfrm.set_socket_policy(client, "in", ["esp"], reqid=REQID)
        client.settimeout(5)
        try:
            client.connect(server.getsockname())
            return client, errors
        except OSError as exc:
            errors.append(exc.errno)
            client.close()
            time.sleep(0.3)
    raise AssertionError(f"no connection through ESP before the deadline; errors {errors}")


def test_socket_policy_acquire_negotiates_sa_and_encrypts(tmp_path: Path) -> None:
    payload = b"charon-socket-policy-marker " * 2000
    with two_hosts() as (na, nb), charon(na, tmp_path / "a") as ca, charon(nb, tmp_path / "b") as cb:
        load_psk_conn(ca, "sock", str(A), str(B), reqid=REQID, policies=False, start_action="trap")
        load_psk_conn(cb, "sock", str(B), str(A), reqid=REQID, policies=False)
        assert [p for p in xfrm.dump_policies(na) if not p.is_socket] == []  # only sockets ask for ESP
        server = socket_in(nb, socket.AF_INET, socket.SOCK_STREAM)
        xfrm.set_socket_policy(server, "out", ["esp"], reqid=REQID)
        xfrm.set_socket_policy(server, "in", ["esp"], reqid=REQID)
        server.bind((str(B), 0))
        server.listen()
        server.settimeout(30)
        with xfrm.XfrmMonitor(("acquire", "sa"), netns=na) as mon, sniffer(nb) as frames:
            client, errors = connect_with_policy(na, server, time.monotonic() + 60)
            conn, _ = server.accept()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            events = list(mon.events(timeout=0.5))
        assert got == payload
        assert errors and errors[0] == errno.EAGAIN, "the first connect must fail closed (no SA yet)"
        assert not any(b"charon-socket-policy-marker" in f for f in frames), "plaintext on the wire"
        acquires = [e.acquire for e in events if isinstance(e, xfrm.XfrmEvent) and e.kind == "acquire"]
        assert acquires and acquires[0].templates[0].reqid == REQID and acquires[0].sel.daddr == B

        # What VICI says about the CHILD_SA is what the kernel's SAD holds.
        (child,) = [c for c in child_sas(ca) if c["state"] == "INSTALLED"]
        assert (child["mode"], child["protocol"], int(child["reqid"])) == ("TRANSPORT", "ESP", REQID)
        out_sa = xfrm.find_state(int(child["spi-out"], 16), "esp", B, na)
        in_sa = xfrm.find_state(int(child["spi-in"], 16), "esp", A, na)
        assert out_sa is not None and in_sa is not None
        assert (out_sa.reqid, out_sa.mode_name, in_sa.reqid) == (REQID, "transport", REQID)
        assert out_sa.algorithm("aead").name == "rfc4106(gcm(aes))" and out_sa.algorithm("aead").key_bits == 160
        assert out_sa.current.bytes >= len(payload) and out_sa.current.packets > 0
        text = {(r["spi"], r["dst"]): r for r in parse_ip_xfrm(ip("-s", "xfrm", "state", netns=na))}
        assert text[(out_sa.spi, str(B))] == view(xfrm.find_state(out_sa.spi, "esp", B, na))
        # No global policy protects the flow, so no data-plane proof for a plain socket.
        flow = Flow(socket.IPPROTO_TCP, A, client.getsockname()[1], B, server.getsockname()[1])
        assert xfrm.policies_covering(flow, netns=na) == []
        for s in (conn, client, server):
            s.close()


def records_from_vici(ch: dict) -> tuple[IkeSA, ChildSA]:
    """Minimal normalized records for one list-sas CHILD_SA (the strongSwan backend does this for real)."""
    ts = tuple(TrafficSelector.from_network(n) for n in ch["local-ts"])
    rts = tuple(TrafficSelector.from_network(n) for n in ch["remote-ts"])
    child = ChildSA(
        name=ch["name"],
        uniqueid=ch["uniqueid"],
        reqid=int(ch["reqid"]),
        state=ch["state"],
        mode=ch["mode"],
        protocol=ch["protocol"],
        spi_in=int(ch["spi-in"], 16),
        spi_out=int(ch["spi-out"], 16),
        encr_alg=ch.get("encr-alg"),
        encr_keysize=int(ch.get("encr-keysize", 0) or 0) or None,
        integ_alg=None,
        local_ts=ts,
        remote_ts=rts,
    )
    ident = Identity(ike_id="", auth_method=AuthMethod.PRESHAREDKEY)
    ike = IkeSA(
        backend="strongswan",
        name=ch["ike"],
        uniqueid="1",
        version=2,
        state=ch["ike-state"],
        local_host=ipaddress.ip_address(ch["local-host"]),
        remote_host=ipaddress.ip_address(ch["remote-host"]),
        local=ident,
        remote=ident,
        children=(child,),
    )
    return ike, child


def test_prove_flow_matches_vici_and_fails_closed(tmp_path: Path) -> None:
    with two_hosts() as (na, nb), charon(na, tmp_path / "a") as ca, charon(nb, tmp_path / "b") as cb:
        load_psk_conn(ca, "pol", str(A), str(B), reqid=REQID)
        load_psk_conn(cb, "pol", str(B), str(A), reqid=REQID)
        for _ in ca.session().initiate({"ike": "pol", "child": "host", "timeout": "30000"}):
            pass
        (ch,) = [c for c in child_sas(ca) if c["state"] == "INSTALLED"]
        ike, child = records_from_vici(ch)
        flow = Flow(socket.IPPROTO_TCP, A, 40000, B, 80)
        proof = xfrm.prove_flow(flow, ike, child, na)
        assert proof is not None, "charon's SA and policies are in the kernel: the flow must be proven"
        assert (proof.dataplane, proof.spi_out, proof.reqid) == ("kernel-xfrm", child.spi_out, REQID)
        assert f"spi 0x{child.spi_out:08x}" in proof.detail
        covering = xfrm.policies_covering(flow, netns=na)
        assert covering and covering[0].templates[0].reqid == REQID
        # Traffic really goes through it.
        server = socket_in(nb, socket.AF_INET, socket.SOCK_STREAM)
        server.bind((str(B), 0))
        server.listen()
        client = socket_in(na, socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(server.getsockname())
        client.sendall(b"x" * 5000)
        client.close()
        server.close()
        assert xfrm.find_state(child.spi_out, "esp", B, na).current.packets > 0
        # The kernel SA vanishes (charon not told): the proof must go, fail closed.
        ip("xfrm", "state", "delete", "src", str(A), "dst", str(B), "proto", "esp", "spi", hex(child.spi_out), netns=na)
        assert xfrm.prove_flow(flow, ike, child, na) is None
        # A flow no policy covers is never proven.
        assert (
            xfrm.prove_flow(Flow(socket.IPPROTO_TCP, A, 1, ipaddress.ip_address("10.99.0.3"), 2), ike, child, na)
            is None
        )
