"""``btns sockets``: every TCP and UDP socket with its IPsec protection (the ``ss`` of IPsec)."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from ..backend import Backend
from ..records import Protection
from . import exits
from .context import open_backend
from .describe import (
    PROTO_NAMES,
    entry_view,
    flow_dict,
    protection_cells,
    protection_dict,
    ptoken_dict,
    verify_view,
)
from .output import emit_json, table
from .sockdiag import SocketEntry, list_sockets, socket_owners

HEADERS = ("PROTO", "STATE", "LOCAL", "PEER", "PROCESS", "PROTECTION", "SPI-IN/OUT", "MODE", "ALG",
           "PEER-ID", "AUTH")


def status_of(entry: SocketEntry, protected: bool) -> str:
    """protected | clear | listening | unconnected"""
    if entry.flow is not None:
        return "protected" if protected else "clear"
    return "listening" if entry.state == "LISTEN" else "unconnected"


def endpoint(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def describe(entry: SocketEntry, backend: Backend, owners: list[tuple[int, str]]) -> tuple[Protection | None, dict]:
    """One socket: sock_diag facts, its processes, and for a connected one its verified protection and pToken."""
    flow = entry.flow
    view = entry_view(entry, backend.netns_id)  # sock_diag's device, mark, uid of that very socket
    protection, token = verify_view(view, backend) if view is not None else (None, None)
    return protection, {
        "proto": PROTO_NAMES[entry.proto],
        "family": 4 if entry.family == socket.AF_INET else 6,
        "state": entry.state,
        "local_addr": str(entry.local_addr), "local_port": entry.local_port,
        "remote_addr": str(entry.remote_addr), "remote_port": entry.remote_port,
        "inode": entry.inode, "uid": entry.uid,
        "processes": [{"pid": pid, "comm": comm} for pid, comm in owners],
        "status": status_of(entry, protection is not None),
        "flow": flow_dict(flow) if flow is not None else None,
        "protection": protection_dict(protection) if protection is not None else None,
        "ptoken": ptoken_dict(token) if token is not None else None,
    }


def row(entry: SocketEntry, protection: Protection | None, d: dict[str, Any]) -> list[Any]:
    procs = ",".join(f"{p['comm']}({p['pid']})" for p in d["processes"])
    if entry.flow is None:
        return [d["proto"], entry.state, endpoint(entry.local_addr, entry.local_port), "*", procs, d["status"]]
    return [d["proto"], entry.state, endpoint(entry.local_addr, entry.local_port),
            endpoint(entry.remote_addr, entry.remote_port), procs, *protection_cells(protection)]


def run(args: argparse.Namespace) -> int:
    entries = list_sockets(args.netns)
    if args.connected:
        entries = [e for e in entries if e.connected]
    backend = open_backend(args)
    owners = socket_owners()
    described = [(e, *describe(e, backend, owners.get(e.inode, []))) for e in entries]
    if args.json:
        emit_json([d for _, _, d in described])
    else:
        table(HEADERS, [row(*x) for x in described])
    return exits.OK
