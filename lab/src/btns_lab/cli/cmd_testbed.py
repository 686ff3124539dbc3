"""``btns testbed up|down|status``: a netns testbed that outlives the command.

``up`` builds a :class:`btns_lab.testbed.Testbed` (two namespaces, a veth pair, one
charon each), brings up one BTNS raw-key connection and records everything ``down``
must remove in the state file; it never calls ``Testbed.close``. ``down`` stops exactly
the recorded charons (pid + start time), deletes the recorded namespaces and workdir.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from btns_vici.cli import exits
from btns_vici.cli.extensions import Command
from btns_vici.cli.output import emit_json, table

from . import tbstate

CONNECTION = "btns"  # the BTNS raw-key connection `up` establishes


def _require_root() -> None:
    if os.geteuid() != 0:
        raise exits.CliError(exits.PERMISSION, "the testbed needs root (network namespaces, TUN, charon)")


def up(path: Path) -> tbstate.TestbedState:
    """Build the testbed, establish the connection, record it; on failure remove what was built."""
    from ..testbed import Testbed, TestbedError

    _require_root()
    if path.exists():
        raise exits.CliError(exits.FAILED, f"a testbed is already recorded in {path}: run `btns testbed down` first")
    try:
        tb = Testbed(keep=False)
    except TestbedError as exc:
        raise exits.CliError(exits.FAILED, str(exc)) from None
    try:
        tb.setup()
        tb.up(CONNECTION, "rawkey")
        peers = []
        for p in tb.peers:
            assert p.pid is not None
            start = tbstate.starttime(p.pid)
            assert start is not None, f"charon {p.name} is not running"
            peers.append(
                tbstate.PeerState(
                    p.name, p.netns, p.pid, start, p.vici_path, str(p.v4), str(p.v6), str(p.v4_plain), str(p.v6_plain)
                )
            )
            p.close_sessions()
        state = tbstate.TestbedState(tb.tag, str(tb.workdir), CONNECTION, time.time(), tuple(peers))
        tbstate.save(state, path)
    except BaseException as exc:
        tb.close()
        if isinstance(exc, TestbedError):
            raise exits.CliError(exits.FAILED, f"testbed setup failed: {exc}") from None
        raise
    return state


def down(path: Path) -> dict[str, Any]:
    """Stop the recorded charons, delete the recorded namespaces and workdir, forget the state."""
    _require_root()
    state = tbstate.load(path)
    if state is None:
        raise exits.CliError(exits.NOT_FOUND, f"no testbed recorded in {path}")
    stopped = tbstate.stop([(p.pid, p.starttime) for p in state.peers])
    deleted = []
    for ns in state.namespaces:
        if os.path.exists(f"/run/netns/{ns}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=True)
            deleted.append(ns)
    workdir = Path(state.workdir)
    removed = _is_testbed_workdir(workdir, state.tag) and workdir.exists()
    if removed:
        shutil.rmtree(workdir)
    path.unlink()
    if path.parent.name.startswith("btns-"):  # our default /run/btns-vici: leave nothing behind
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return {
        "stopped_pids": stopped,
        "deleted_namespaces": deleted,
        "removed_workdir": str(workdir) if removed else None,
    }


def _is_testbed_workdir(workdir: Path, tag: str) -> bool:
    """Only ever delete a directory Testbed made: <tmp>/btns-tb-<tag>-*."""
    from ..testbed import NETNS_PREFIX

    return workdir.is_absolute() and workdir.name.startswith(f"{NETNS_PREFIX}{tag}-")


def health(state: tbstate.TestbedState) -> list[dict[str, Any]]:
    """Per peer: charon alive (the recorded process), namespace present, VICI answering, SA count."""
    from btns_vici.strongswan.session import ViciSession  # on use: every `btns` command loads this module

    out = []
    for p in state.peers:
        answers, sas, version = False, None, None
        session = ViciSession(p.vici_socket, timeout=2.0)
        with contextlib.suppress(OSError):
            version = session.request("version").get("version", b"").decode()
            sas = len(session.list_sas())
            answers = True
        session.close()
        out.append(
            {
                "peer": p.name,
                "netns": p.netns,
                "netns_present": os.path.exists(f"/run/netns/{p.netns}"),
                "pid": p.pid,
                "running": tbstate.alive(p.pid, p.starttime),
                "vici_socket": p.vici_socket,
                "vici_answers": answers,
                "charon_version": version,
                "ike_sas": sas,
                "v4": p.v4,
                "v6": p.v6,
                "v4_plain": p.v4_plain,
                "v6_plain": p.v6_plain,
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    path = tbstate.state_path(args.state)
    if args.action == "up":
        state = up(path)
        if args.json:
            emit_json({"state_file": str(path), **dataclasses.asdict(state)})
        else:
            print(f"testbed {state.tag} up, connection {state.connection!r} established; state in {path}")
            _peer_table(health(state))
            print(
                f"try: btns sockets --netns {state.peers[0].netns}; btns sas --netns {state.peers[0].netns}; "
                "btns testbed down"
            )
        return exits.OK
    if args.action == "down":
        done = down(path)
        if args.json:
            emit_json(done)
        else:
            print(
                f"testbed down: stopped pids {done['stopped_pids'] or 'none (already gone)'}, "
                f"deleted namespaces {done['deleted_namespaces'] or 'none'}, "
                f"removed {done['removed_workdir'] or 'no workdir'}"
            )
        return exits.OK
    state = tbstate.load(path)
    if state is None:
        raise exits.CliError(exits.NOT_FOUND, f"no testbed recorded in {path}")
    peers = health(state)
    healthy = all(p["running"] and p["netns_present"] and p["vici_answers"] for p in peers)
    if args.json:
        emit_json(
            {
                "state_file": str(path),
                "tag": state.tag,
                "workdir": state.workdir,
                "connection": state.connection,
                "healthy": healthy,
                "peers": peers,
            }
        )
    else:
        print(f"testbed {state.tag} ({'healthy' if healthy else 'UNHEALTHY'}), workdir {state.workdir}, state {path}")
        _peer_table(peers)
    return exits.OK if healthy else exits.NEGATIVE


def _peer_table(peers: list[dict[str, Any]]) -> None:
    table(
        ("PEER", "NETNS", "PID", "RUNNING", "VICI", "IKE_SAS", "ADDRESSES", "VICI-SOCKET"),
        [
            [
                p["peer"],
                p["netns"],
                p["pid"],
                "yes" if p["running"] else "no",
                "answers" if p["vici_answers"] else "down",
                p["ike_sas"],
                f"{p['v4']} {p['v6']} (plain {p['v4_plain']} {p['v6_plain']})",
                p["vici_socket"],
            ]
            for p in peers
        ],
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("up", "down", "status"), metavar="ACTION", help="up, status or down")
    p.add_argument(
        "--state", metavar="PATH", help=f"state file (default: ${tbstate.STATE_ENV}, else {tbstate.DEFAULT_STATE})"
    )


def netns_options(netns_name: str) -> dict[str, str]:
    """The VICI socket of the recorded testbed's peer in ``netns_name`` ({} when none is recorded there)."""
    state = tbstate.load(tbstate.state_path())
    peer = state.peer_in(netns_name) if state else None
    return {"vici_socket": peer.vici_socket} if peer is not None else {}


#: ``btns testbed`` (entry point btns_vici.cli: testbed)
COMMAND = Command(
    summary="a persistent two-namespace strongSwan testbed",
    description="up: create two network namespaces joined by a veth pair, start one charon in each\n"
    "(kernel-libipsec) and establish the BTNS raw-key connection `btns` between\n"
    "10.231.0.1 and 10.231.0.2 (fd00:b75::1/::2); 10.231.0.11/.12 are plain addresses no SA\n"
    "covers. The testbed stays up; what `down` must remove is recorded in the state file.\n"
    "status: show the recorded testbed and whether its charons run and answer (exit 1 when\n"
    "not). down: stop exactly the recorded charons, delete the recorded namespaces and workdir.\n"
    "Other commands given --netns of a recorded namespace use that peer's VICI socket.\n"
    "(From btns-lab.)",
    add_arguments=add_arguments,
    run=run,
    netns_options=netns_options,
    environment=((tbstate.STATE_ENV, "state file of btns testbed"),),
)
