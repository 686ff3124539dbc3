"""``btns sockets``: every TCP and UDP socket with its IPsec protection (the ``ss`` of IPsec)."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from ..backend import Backend
from ..records import Protection
from . import exits
from .context import open_backend
from .describe import PROTO_NAMES, flow_dict, protection_cells, protection_dict, ptoken_dict, verify_flow
from .output import emit_json, table
from .sockdiag import SocketEntry, list_sockets, socket_holders
from .ssfilter import LISTENING, FilterError, Selection, parse

HEADERS = ("PROTO", "STATE", "LOCAL", "PEER", "PROCESS", "PROTECTION", "SPI-IN/OUT", "MODE", "ALG",
           "PEER-ID", "AUTH")


def status_of(entry: SocketEntry, protected: bool) -> str:
    """protected | clear | listening | unconnected"""
    if entry.flow is not None:
        return "protected" if protected else "clear"
    return "listening" if entry.state == "LISTEN" else "unconnected"


def endpoint(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def describe(entry: SocketEntry, backend: Backend,
             owners: list[tuple[int, str, int]]) -> tuple[Protection | None, dict]:
    """One socket: sock_diag facts, its processes, and for a connected one its verified protection and pToken."""
    flow = entry.flow
    protection, token = verify_flow(flow, backend) if flow is not None else (None, None)
    return protection, {
        "proto": PROTO_NAMES[entry.proto],
        "family": 4 if entry.family == socket.AF_INET else 6,
        "state": entry.state,
        "local_addr": str(entry.local_addr), "local_port": entry.local_port,
        "remote_addr": str(entry.remote_addr), "remote_port": entry.remote_port,
        "inode": entry.inode, "uid": entry.uid,
        "processes": [{"pid": pid, "comm": comm, "fd": fd} for pid, comm, fd in owners],
        "status": status_of(entry, protection is not None),
        "flow": flow_dict(flow) if flow is not None else None,
        "protection": protection_dict(protection) if protection is not None else None,
        "ptoken": ptoken_dict(token) if token is not None else None,
    }


def users(processes: list[dict[str, Any]]) -> str:
    """The PROCESS cell as ``ss -p`` prints it: users:(("name",pid=P,fd=N),...)."""
    if not processes:
        return ""
    return "users:(" + ",".join(f'("{p["comm"]}",pid={p["pid"]},fd={p["fd"]})' for p in processes) + ")"


def row(entry: SocketEntry, protection: Protection | None, d: dict[str, Any]) -> list[Any]:
    procs = users(d["processes"])
    if entry.flow is None:
        return [d["proto"], entry.state, endpoint(entry.local_addr, entry.local_port), "*", procs, d["status"]]
    return [d["proto"], entry.state, endpoint(entry.local_addr, entry.local_port),
            endpoint(entry.remote_addr, entry.remote_port), procs, *protection_cells(protection)]


def selection(args: argparse.Namespace) -> tuple[Selection, set[int] | None, set[int] | None]:
    """The ss-style options and FILTER words -> (selection, protocols, families); CliError(USAGE) if bad."""
    try:
        sel = parse(getattr(args, "filter", None) or [], LISTENING if getattr(args, "listening", False) else None)
    except FilterError as exc:
        raise exits.CliError(exits.USAGE, f"bad filter: {exc}") from None
    protocols = {p for flag, p in (("tcp", socket.IPPROTO_TCP), ("udp", socket.IPPROTO_UDP))
                 if getattr(args, flag, False)} or None
    families = {f for flag, f in (("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6))
                if getattr(args, flag, False)} or None
    return sel, protocols, families


def run(args: argparse.Namespace) -> int:
    sel, protocols, families = selection(args)
    entries = list_sockets(args.netns, protocols=protocols, families=families, states=sel.states)
    if sel.predicate is not None:
        entries = [e for e in entries if sel.predicate(e)]
    if args.connected:
        entries = [e for e in entries if e.connected]
    backend = open_backend(args)
    holders = socket_holders()
    described = [(e, *describe(e, backend, holders.get(e.inode, []))) for e in entries]
    if args.json:
        emit_json([d for _, _, d in described])
    else:
        table(HEADERS, [row(*x) for x in described])
    return exits.OK
