"""``btns token --pid P --fd N``: the pToken and iToken of another process's socket (draft 2.3.3).

The descriptor is borrowed with pidfd_getfd(2); the socket's network namespace (for the
data-plane proof and, for a recorded testbed, the VICI socket) is found from the socket
itself (SIOCGSKNS) unless ``--netns`` is given.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from ..core.errors import BtnsError
from ..sockets import SIOCGSKNS, check_inet, is_connected, resolve_fd, view_of
from . import exits
from .context import open_backend
from .describe import describe_ptoken, flow_dict, protection_dict, ptoken_dict, verify_view
from .output import emit_json
from .pidfd import borrow_socket

NETNS_DIR = "/run/netns"  # where `ip netns add` names namespaces


def borrow(pid: int, fd: int) -> socket.socket:
    """Process ``pid``'s descriptor ``fd`` as a socket object of ours, or CliError."""
    try:
        num = borrow_socket(pid, fd)  # (through a helper: never a descriptor whose close may hang: pidfd.py)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise exits.CliError(
                exits.NOT_FOUND, f"file descriptor {fd} of process {pid} is not a socket ({_describe_fd(pid, fd)})"
            ) from None
        if exc.errno == errno.ESRCH:
            raise exits.CliError(exits.NOT_FOUND, f"no process {pid}") from None
        if exc.errno == errno.EBADF:
            raise exits.CliError(exits.NOT_FOUND, f"process {pid} has no open file descriptor {fd}") from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise exits.CliError(
                exits.PERMISSION,
                f"not permitted to take file descriptor {fd} of process {pid} (pidfd_getfd: {os.strerror(exc.errno)}); "
                "it needs ptrace access to the process: run as root or as its owner "
                "(kernel.yama.ptrace_scope permitting)",
            ) from None
        raise
    try:
        resolve_fd(num)
    except BtnsError:
        what = _describe_fd(pid, fd)
        os.close(num)
        raise exits.CliError(
            exits.NOT_FOUND, f"file descriptor {fd} of process {pid} is not a socket ({what})"
        ) from None
    sock = socket.socket(fileno=num)
    try:
        check_inet(sock)
    except BtnsError as exc:
        sock.close()
        raise exits.CliError(exits.NOT_FOUND, f"file descriptor {fd} of process {pid}: {exc.strerror}") from None
    return sock


def _describe_fd(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "unknown kind"


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def socket_netns(sock: socket.socket, pid: int) -> str | None:
    """The socket's network namespace: None for ours, else its name under /run/netns or a /proc path."""
    ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        st = os.fstat(ns_fd)
    finally:
        os.close(ns_fd)
    ident = (st.st_dev, st.st_ino)
    if ident == _ns_id("/proc/self/ns/net"):
        return None
    named = Path(NETNS_DIR)
    for entry in sorted(named.iterdir()) if named.is_dir() else []:
        try:
            if _ns_id(str(entry)) == ident:
                return entry.name
        except OSError:
            continue
    if _ns_id(f"/proc/{pid}/ns/net") == ident:
        return f"/proc/{pid}/ns/net"
    raise exits.CliError(exits.NOT_FOUND, "the socket lives in a network namespace without a name: pass --netns")


def run(args: argparse.Namespace) -> int:
    with borrow(args.pid, args.fd) as sock:
        ns = args.netns or socket_netns(sock, args.pid)
        head: dict[str, Any] = {"pid": args.pid, "fd": args.fd, "netns": ns, "local": sock.getsockname()[:2]}
        if not is_connected(sock):
            result = {**head, "status": "unconnected", "flow": None, "protection": None, "ptoken": None}
            _print(
                args,
                result,
                [
                    f"process {args.pid} fd {args.fd}: socket {head['local']} is not connected: "
                    "it has no flow, hence no protection (a pToken set with ipsec_set_socket_pToken "
                    "lives in that process only)"
                ],
            )
            return exits.NEGATIVE
        view = view_of(sock)  # the socket itself: namespace, device, mark, uid, TOS, ...
        flow = view.flow
        backend = open_backend(args, ns)
        protection, token = verify_view(view, backend)
    result = {
        **head,
        "status": "protected" if protection else "clear",
        "flow": flow_dict(flow),
        "protection": protection_dict(protection) if protection else None,
        "ptoken": ptoken_dict(token),
    }
    lines = [
        f"process {args.pid} fd {args.fd}: {flow}{f' (netns {ns})' if ns else ''}",
        *describe_ptoken("pToken", token),
    ]
    _print(args, result, lines)
    return exits.OK if protection else exits.NEGATIVE


def _print(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        emit_json(result)
    else:
        print("\n".join(lines), flush=True)
