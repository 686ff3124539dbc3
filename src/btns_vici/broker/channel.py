"""The channel between btnsd's main process and one worker: a unix SOCK_SEQPACKET socketpair.

One message per packet: kind (1 byte) | flags (1 byte) | client ident (4 bytes, big-endian) |
payload, with at most one SCM_RIGHTS descriptor. Main -> worker:

* ``CLIENT``  a client connection to read (the descriptor); payload pid, uid, gid (``!iII``);
* ``DROP``    main closed the client: close your copy (nothing sent back).

Worker -> main:

* ``FORWARD`` a request the worker does not answer itself, as the client sent it (payload: the
  frame; the client's descriptor, if any; flags bit 0: the client's packet was truncated);
* ``GONE``    the client went away (EOF, or it did not read its answers): drop it;
* ``STATS``   about every second: the worker's metrics tally and the idents of its clients that
  sent requests (their idle clocks), as JSON.

Main -> zygote (its own socketpair): ``SPAWN`` with a new channel's worker end; the zygote
forks a worker on it and answers its pid (4 bytes).

Bounded: a packet is at most :data:`MAX` bytes; the socketpair's send buffer bounds what is queued
(a sender that must not block sends with MSG_DONTWAIT and handles EAGAIN).
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

from . import protocol

CLIENT, DROP, FORWARD, GONE, STATS, SPAWN = 1, 2, 3, 4, 5, 6
HEAD = struct.Struct("!BBI")
CRED = struct.Struct("!iII")
TRUNCATED = 1
MAX = HEAD.size + protocol.MAX_FRAME + 1
#: the socketpair's buffers (net.core.wmem_max caps them): ~60 full-size forwarded requests
BUFFER = 4 * 1024 * 1024


def pair() -> tuple[socket.socket, socket.socket]:
    """(main's end, the worker's end), both close-on-exec."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for s in (a, b):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
    return a, b


def message(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEAD.pack(kind, flags, ident & 0xFFFFFFFF) + payload


def send(sock: socket.socket, data: bytes, fd: int = -1, flags: int = 0) -> None:
    """One message, with ``fd`` as SCM_RIGHTS when >= 0 (OSError as sendmsg raises it)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())] if fd >= 0 else []
    sock.sendmsg([data], anc, flags)


def receive(sock: socket.socket) -> tuple[int, int, int, bytes, int] | None:
    """(kind, flags, ident, payload, fd or -1) of the next message, kind 0 for a malformed one
    (its descriptor closed); None at EOF (the other process is gone). BlockingIOError when
    nothing is queued."""
    data, anc, _flags, _ = sock.recvmsg(MAX, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not anc:
        return None
    if len(data) < HEAD.size or len(fds) > 1:
        for fd in fds:
            _close(fd)
        return 0, 0, 0, b"", -1
    kind, flags, ident = HEAD.unpack_from(data)
    return kind, flags, ident, bytes(data[HEAD.size :]), fds[0] if fds else -1


def stats(tally: dict[str, Any] | None, active: list[int]) -> bytes:
    return message(STATS, 0, json.dumps({"tally": tally, "active": active}, separators=(",", ":")).encode())


def parse_stats(payload: bytes) -> tuple[Any, list[int]]:
    """(tally, active idents) of a STATS payload; ({}, []) when malformed."""
    try:
        obj = json.loads(payload)
        active = [int(i) for i in obj.get("active", [])]
        return obj.get("tally"), active
    except (ValueError, TypeError, AttributeError):
        return {}, []


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
