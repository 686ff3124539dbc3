"""The short path of `btns sas` / `btns sockets` (cli/context.list_sas: strongswan/listing.py
straight, no plugin manager; list-sas filters sent to charon; the full backend opened only for
covered flows), taken when the built-in backend is named and when none is and charon answers,
must answer what the library's full path answers (plugins.get_backend: Backend.list_sas through
the hook, Backend.protect), on the testbed."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from btns_vici.cli.cmd_sas import select
from btns_vici.cli.cmd_sockets import Snapshot, describe
from btns_vici.cli.output import jsonable
from btns_vici.cli.sockdiag import list_sockets, socket_holders
from btns_vici.plugins import get_backend

from .conftest import btns, btns_json, peer_args


def _stable(sas: list[dict]) -> list[dict]:
    """The SA records without the counters and clocks that move between two listings."""
    moving = {"bytes_in", "bytes_out", "packets_in", "packets_out", "install_time", "rekey_time", "life_time"}
    out = []
    for sa in sas:
        sa = {k: v for k, v in sa.items() if k not in {"established", "extra"}}
        sa["children"] = [{k: v for k, v in c.items() if k not in moving} for c in sa["children"]]
        out.append(sa)
    return out


def _library(peer) -> object:
    return get_backend("strongswan", {"netns": peer.netns, "vici_socket": peer.vici_path})


def test_sas_short_path_answers_what_the_library_answers(tb, conn):
    full = _library(tb.a).list_sas()
    want = _stable(jsonable(full))
    assert any(sa["name"] == conn for sa in want)
    assert _stable(btns_json("sas", *peer_args(tb.a))) == want
    assert _stable(btns_json("--backend", "strongswan", "sas", *peer_args(tb.a))) == want
    for flags, sel in (
        (["--ike", conn], {"ike": conn}),
        (["--child", "host"], {"child": "host"}),
        (["--ike", conn, "--child", "nosuchchild"], {"ike": conn, "child": "nosuchchild"}),
        (["--ike-id", "x"], {"ike_id": "x"}),
    ):
        args = SimpleNamespace(**{"ike": None, "ike_id": None, "child": None, "child_id": None, **sel})
        assert _stable(btns_json("sas", *flags, *peer_args(tb.a))) == _stable(jsonable(select(full, args))), flags


def test_sockets_short_path_answers_what_the_library_answers(tb, conn, pair_factory):
    protected, _ = pair_factory(socket.IPPROTO_TCP, 4)
    port = protected.getsockname()[1]
    snap, holders = Snapshot(_library(tb.a)), socket_holders()
    try:
        full = [describe(e, snap, holders.get(e.inode, []))[1] for e in list_sockets(tb.a.netns) if e.connected]
    finally:
        snap.close()  # (its descriptor-borrowing helper, reaped)

    def by_flow(entries: list[dict]) -> dict:
        return {(e["proto"], e["local_addr"], e["local_port"], e["remote_addr"], e["remote_port"]): e for e in entries}

    want = by_flow(full)
    for named in ([], ["--backend", "strongswan"]):
        got = btns_json(*named, "sockets", "--connected", *peer_args(tb.a))
        mine = next(e for e in got if e["proto"] == "tcp" and e["local_port"] == port)
        assert mine["status"] == "protected" and mine["protection"]["sa"] == f"{conn}/host"
        assert mine["ptoken"]["protected"] is True
        have = by_flow(got)
        assert (mine["proto"], mine["local_addr"], port, mine["remote_addr"], mine["remote_port"]) in want
        for key in want.keys() & have.keys():  # sockets present in both listings (some come and go)
            assert (have[key]["status"], have[key]["protection"]) == (want[key]["status"], want[key]["protection"])
            assert have[key]["ptoken"] == want[key]["ptoken"], key
    table = btns("sockets", *peer_args(tb.a))
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if f":{port} " in line and line.startswith("tcp"))
    assert f"{conn}/host" in row and "BTNS" in row
