"""A fake charon: a real AF_UNIX VICI server in a thread, scripted per test to misbehave.

``FakeVici(path, handler)``: every accepted connection runs ``handler(conn)`` in its own
thread. Helpers read requests and write well-formed (or deliberately broken) packets.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

from vici.protocol import Message

CMD_REQUEST, CMD_RESPONSE, CMD_UNKNOWN = 0, 1, 2
EVENT_REGISTER, EVENT_UNREGISTER, EVENT_CONFIRM, EVENT_UNKNOWN, EVENT = 3, 4, 5, 6, 7


def encode(msg: Mapping[str, Any]) -> bytes:
    return bytes(Message.serialize(dict(msg)))


def packet(kind: int, body: bytes = b"", name: str | None = None) -> bytes:
    head = bytes([kind]) + (bytes([len(name)]) + name.encode() if name is not None else b"")
    payload = head + body
    return struct.pack("!I", len(payload)) + payload


def response(msg: Mapping[str, Any] | None = None) -> bytes:
    return packet(CMD_RESPONSE, encode(msg or {}))


def event(name: str, msg: Mapping[str, Any]) -> bytes:
    return packet(EVENT, encode(msg), name)


def read_request(conn: socket.socket) -> tuple[int, str] | None:
    """(packet type, command or event name) of the next request, None at EOF."""
    head = _read(conn, 4)
    if head is None:
        return None
    (n,) = struct.unpack("!I", head)
    body = _read(conn, n)
    if body is None:
        return None
    kind = body[0]
    name = body[2 : 2 + body[1]].decode() if len(body) > 1 else ""
    return kind, name


def _read(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


Handler = Callable[[socket.socket], None]


class FakeVici:
    """Serve ``handler`` on ``path`` until closed (a context manager)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()

    def __enter__(self) -> FakeVici:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scripted(listing: Callable[[str], list[bytes]], replies: Mapping[str, bytes] | None = None) -> Handler:
    """A charon that confirms every event registration, answers ``version`` and ``stats``, and
    streams ``listing(command)`` raw packets before the (empty) reply of list commands."""

    def handler(conn: socket.socket) -> None:
        while (req := read_request(conn)) is not None:
            kind, name = req
            if kind in (EVENT_REGISTER, EVENT_UNREGISTER):
                conn.sendall(packet(EVENT_CONFIRM))
            elif replies and name in replies:
                conn.sendall(replies[name])
            elif name == "version":
                conn.sendall(response({"daemon": "charon", "version": "5.9.8"}))
            elif name == "stats":
                conn.sendall(response({"ikesas": {"total": "1", "half-open": "0"}, "plugins": ["vici"]}))
            elif name.startswith("list-"):
                for raw in listing(name):
                    conn.sendall(raw)
                conn.sendall(response())
            else:
                conn.sendall(packet(CMD_UNKNOWN))

    return handler
