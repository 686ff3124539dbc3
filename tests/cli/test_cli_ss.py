"""`btns sockets` with ss's selection flags and filter expressions, its PROCESS column, `btns sas`
filters, --version, and exit 4 for a user who may not reach the IKE daemon."""

from __future__ import annotations

import os
import socket

import pytest

from btns_vici import __version__

from .conftest import btns, btns_json, peer_args

pytestmark = pytest.mark.testbed


def test_version():
    res = btns("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"btns {__version__}"


def _ports(entries: list[dict]) -> set[tuple[str, int]]:
    return {(e["proto"], e["local_port"]) for e in entries}


def test_selection_flags_and_filters(tb, conn, pair_factory):
    tcp4, _ = pair_factory(socket.IPPROTO_TCP, 4)
    clear4, _ = pair_factory(socket.IPPROTO_TCP, 4, plain=True)
    udp4, _ = pair_factory(socket.IPPROTO_UDP, 4)
    with tb.in_netns(tb.a):
        listener = socket.socket()
        unconn = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with listener, unconn:
        listener.bind((str(tb.a.addr(4)), 0))
        listener.listen(1)
        unconn.bind(("::", 0))
        p_tcp, p_clear, p_udp = tcp4.getsockname()[1], clear4.getsockname()[1], udp4.getsockname()[1]
        p_lst, p_unconn = listener.getsockname()[1], unconn.getsockname()[1]
        args = peer_args(tb.a)

        everything = _ports(btns_json("sockets", *args))
        assert {("tcp", p_tcp), ("tcp", p_clear), ("udp", p_udp), ("tcp", p_lst), ("udp", p_unconn)} <= everything

        tcp = btns_json("sockets", "-t", *args)
        assert {e["proto"] for e in tcp} == {"tcp"} and ("tcp", p_lst) in _ports(tcp)
        udp6 = btns_json("sockets", "-u6", *args)
        assert {(e["proto"], e["family"]) for e in udp6} == {("udp", 6)} and ("udp", p_unconn) in _ports(udp6)
        listening = btns_json("sockets", "-l", *args)
        assert {e["state"] for e in listening} <= {"LISTEN", "UNCONN"}
        assert {("tcp", p_lst), ("udp", p_unconn)} <= _ports(listening) and ("tcp", p_tcp) not in _ports(listening)
        assert _ports(btns_json("sockets", "-ta", *args)) == _ports(tcp)  # -a: every state (the default)

        est = btns_json("sockets", "-t", "state", "established", *args)
        assert {e["state"] for e in est} == {"ESTAB"} and {("tcp", p_tcp), ("tcp", p_clear)} <= _ports(est)
        assert ("tcp", p_lst) in _ports(btns_json("sockets", "-t", "state", "listening", *args))
        excl = btns_json("sockets", "-t", *args, "exclude", "listening")
        assert "LISTEN" not in {e["state"] for e in excl}

        one = btns_json("sockets", *args, "sport", "=", f":{p_tcp}")
        assert _ports(one) == {("tcp", p_tcp)} and one[0]["status"] == "protected"
        assert _ports(btns_json("sockets", *args, f"sport == {p_clear}")) == {("tcp", p_clear)}
        both = btns_json("sockets", "-t", *args, f"( sport = :{p_tcp} or sport = :{p_clear} )")
        assert _ports(both) == {("tcp", p_tcp), ("tcp", p_clear)}
        peer_port = tcp4.getpeername()[1]
        assert _ports(btns_json("sockets", *args, "dport", "eq", str(peer_port))) == {("tcp", p_tcp)}
        dst = btns_json("sockets", "-t", *args, "state", "established", "dst", f"{tb.b.v4}/32")
        assert dst and all(e["remote_addr"] == str(tb.b.v4) for e in dst)
        assert btns_json("sockets", *args, "dst", "192.0.2.0/24") == []
        src = btns_json("sockets", *args, "src", f"{tb.a.v4}:{p_tcp}")
        assert _ports(src) == {("tcp", p_tcp)}
        notdst = btns_json("sockets", "-t", *args, "state", "established", "not", "dst", str(tb.b.v4))
        assert all(e["remote_addr"] != str(tb.b.v4) for e in notdst)
        gt = btns_json(
            "sockets",
            "-t",
            *args,
            "sport",
            ">",
            str(max(p_tcp, p_clear) - 1),
            "and",
            "sport",
            "<=",
            str(max(p_tcp, p_clear)),
        )
        assert _ports(gt) == {("tcp", max(p_tcp, p_clear))}

        text = btns("sockets", "-tn", "-p", *args, "sport", "=", str(p_tcp))
        assert text.returncode == 0, text.stderr
        row = text.stdout.splitlines()[1]
        assert f"pid={os.getpid()},fd={tcp4.fileno()})" in row and row.split()[4].startswith('users:(("')


@pytest.mark.parametrize(
    "words",
    [
        ["state", "nosuch"],
        ["dport", "=", "notaport99"],
        ["dst"],
        ["(", "sport", "=", "1"],
        ["frobnicate"],
        ["dst", "300.1.1.1"],
    ],
)
def test_bad_filters_are_exit_2(tb, words):
    res = btns("sockets", *peer_args(tb.a), *words)
    assert res.returncode == 2 and "bad filter" in res.stderr, res.stderr


def test_sas_filters(tb, conn):
    args = peer_args(tb.a)
    everything = btns_json("sas", *args)
    mine = next(sa for sa in everything if sa["name"] == conn)
    only = btns_json("sas", "--ike", conn, *args)
    assert [sa["name"] for sa in only] == [conn]
    assert btns_json("sas", "--ike-id", mine["uniqueid"], *args)[0]["uniqueid"] == mine["uniqueid"]
    child = mine["children"][0]
    by_child = btns_json("sas", "--ike", conn, "--child", child["name"], *args)
    assert [c["name"] for c in by_child[0]["children"]] == [child["name"]]
    assert btns_json("sas", "--child-id", child["uniqueid"], *args)[0]["children"][0]["uniqueid"] == child["uniqueid"]
    assert btns_json("sas", "--ike", "btns-no-such-conn", *args) == []
    assert btns_json("sas", "--ike", conn, "--child", "no-such-child", *args) == []
    text = btns("sas", "--ike", conn, *args)
    assert text.returncode == 0 and all(line.startswith(f"{conn}#") for line in text.stdout.splitlines()[1:])


def test_unreachable_control_socket_is_exit_4(tmp_path):
    """A VICI socket that refuses a non-root user gives exit 4 (permission), not 3 (daemon down)."""
    import shutil

    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run btns as another user"
    base = tmp_path / "ctl"
    base.mkdir()
    path = base / "charon.vici"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with srv:
        srv.bind(str(path))
        srv.listen(1)
        path.chmod(0o600)
        res = btns(
            "--backend",
            "strongswan",
            "--vici-socket",
            str(path),
            "sas",
            prefix=[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"],
        )
    assert res.returncode == 4, res.stderr
    assert "permission denied" in res.stderr and str(path) in res.stderr
