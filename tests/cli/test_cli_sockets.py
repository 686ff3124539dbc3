"""`btns sockets` and `btns sas` on the testbed: a protected and a clear socket, the SA."""

from __future__ import annotations

import os
import socket

import pytest

from .conftest import btns, btns_json, peer_args

pytestmark = pytest.mark.testbed


def _by_port(entries: list[dict], port: int) -> dict:
    found = [e for e in entries if e["local_port"] == port and e["proto"] == "tcp"]
    assert len(found) == 1, f"no single socket with local port {port} in {entries}"
    return found[0]


def test_sockets_shows_protected_clear_and_listening(tb, conn, pair_factory, backend_a):
    protected, _ = pair_factory(socket.IPPROTO_TCP, 4)
    clear, _ = pair_factory(socket.IPPROTO_TCP, 4, plain=True)
    with tb.in_netns(tb.a):
        listener = socket.socket()
    with listener:
        listener.bind((str(tb.a.addr(4)), 0))
        listener.listen(1)
        entries = btns_json("sockets", *peer_args(tb.a))

        ike = next(sa for sa in backend_a.list_sas() if sa.name == conn)
        child = ike.children[0]
        p = _by_port(entries, protected.getsockname()[1])
        assert p["status"] == "protected" and p["ptoken"]["protected"] is True
        assert p["protection"]["sa"] == f"{conn}/host"
        assert p["protection"]["mode"] == "TUNNEL" and p["protection"]["protocol"] == "ESP"
        assert p["protection"]["spi_in"] == f"{child.spi_in:08x}"
        assert p["protection"]["spi_out"] == f"{child.spi_out:08x}"
        assert p["protection"]["algorithms"].startswith("CHACHA20_POLY1305")
        assert p["protection"]["peer_id"] == f"b-{conn}-v4@btns.test"
        assert p["protection"]["auth_method"] == "BTNS"
        assert p["ptoken"]["iToken"]["pubKeyID"] == tb.b.key.public_der.hex()
        assert p["processes"] == [{"pid": os.getpid(), "comm": p["processes"][0]["comm"], "fd": protected.fileno()}]

        c = _by_port(entries, clear.getsockname()[1])
        assert c["status"] == "clear" and c["protection"] is None
        assert c["ptoken"]["protected"] is False and c["ptoken"]["privacyProtected"] == "DISABLE"
        assert c["ptoken"]["iToken"] is None

        lst = _by_port(entries, listener.getsockname()[1])
        assert lst["state"] == "LISTEN" and lst["status"] == "listening" and lst["ptoken"] is None

        text = btns("sockets", *peer_args(tb.a))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:6] == ["PROTO", "STATE", "LOCAL", "PEER", "PROCESS", "PROTECTION"]
    row = next(line for line in lines if f":{protected.getsockname()[1]} " in line)
    assert f"{conn}/host" in row and "esp/tunnel" in row and "BTNS" in row and f"{child.spi_in:08x}" in row
    row = next(line for line in lines if f":{clear.getsockname()[1]} " in line)
    assert row.split()[5] == "clear"


def test_sockets_connected_filter_and_ipv6_udp(tb, pair_factory):
    tb.up("cli-v6", "rawkey", 6)
    protected, _ = pair_factory(socket.IPPROTO_UDP, 6)
    entries = btns_json("sockets", "--connected", *peer_args(tb.a))
    assert entries and all(e["flow"] is not None for e in entries)
    udp = next(e for e in entries if e["proto"] == "udp" and e["local_port"] == protected.getsockname()[1])
    assert udp["family"] == 6 and udp["status"] == "protected"
    assert udp["protection"]["sa"] == "cli-v6/host" and udp["flow"]["remote_addr"] == str(tb.b.v6)


def test_sas_lists_the_sa_on_both_ends(tb, conn):
    a = btns_json("sas", *peer_args(tb.a))
    b = btns_json("sas", *peer_args(tb.b))
    ike_a = next(sa for sa in a if sa["name"] == conn)
    ike_b = next(sa for sa in b if sa["name"] == conn)
    assert ike_a["state"] == ike_b["state"] == "ESTABLISHED"
    assert ike_a["remote"]["auth_method"] == "BTNS" and ike_a["remote"]["public_key"] == tb.b.key.public_der.hex()
    (ca,), (cb,) = ike_a["children"], ike_b["children"]
    assert ca["state"] == "INSTALLED" and ca["mode"] == "TUNNEL"
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"])
    assert ca["local_ts"] == [f"{tb.a.v4}/32"] and ca["remote_ts"] == [f"{tb.b.v4}/32"]

    text = btns("sas", *peer_args(tb.a))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith("IKE_SA")
    row = next(line for line in text.stdout.splitlines() if line.startswith(f"{conn}#"))
    assert "ESTABLISHED" in row and "INSTALLED" in row and f"{ca['spi_in']:08x}" in row
