"""The built-in backend named (`--backend strongswan`) takes the short path (cli/context.list_sas:
strongswan/listing.py straight, no plugin manager; list-sas filters sent to charon; the full
backend opened only for covered flows). It must answer what the default selection (the plugin
manager, every backend probed, Backend.list_sas and Backend.protect) answers, on the testbed."""

from __future__ import annotations

import socket

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


def test_sas_short_path_answers_what_the_plugin_manager_answers(tb, conn):
    default = btns_json("sas", *peer_args(tb.a))
    named = btns_json("--backend", "strongswan", "sas", *peer_args(tb.a))
    assert any(sa["name"] == conn for sa in named)
    assert _stable(named) == _stable(default)
    for flags in (["--ike", conn], ["--child", "host"], ["--ike", conn, "--child", "nosuchchild"], ["--ike-id", "x"]):
        assert _stable(btns_json("--backend", "strongswan", "sas", *flags, *peer_args(tb.a))) == _stable(
            btns_json("sas", *flags, *peer_args(tb.a))
        ), flags


def test_sockets_short_path_answers_what_the_plugin_manager_answers(tb, conn, pair_factory):
    protected, _ = pair_factory(socket.IPPROTO_TCP, 4)
    port = protected.getsockname()[1]
    default = btns_json("sockets", "--connected", *peer_args(tb.a))
    named = btns_json("--backend", "strongswan", "sockets", "--connected", *peer_args(tb.a))

    def by_flow(entries: list[dict]) -> dict:
        return {(e["proto"], e["local_addr"], e["local_port"], e["remote_addr"], e["remote_port"]): e for e in entries}

    mine = next(e for e in named if e["proto"] == "tcp" and e["local_port"] == port)
    assert mine["status"] == "protected" and mine["protection"]["sa"] == f"{conn}/host"
    assert mine["ptoken"]["protected"] is True
    d, n = by_flow(default), by_flow(named)
    for key in d.keys() & n.keys():  # sockets present in both listings (some may come and go)
        assert (n[key]["status"], n[key]["protection"]) == (d[key]["status"], d[key]["protection"]), key
        assert n[key]["ptoken"] == d[key]["ptoken"], key
    table = btns("--backend", "strongswan", "sockets", *peer_args(tb.a))
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if f":{port} " in line and line.startswith("tcp"))
    assert f"{conn}/host" in row and "BTNS" in row
