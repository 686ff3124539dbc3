"""A VICI event stream read without blocking: the SA index drains it before each answer.

A dedicated connection registers for the SA events; :meth:`EventStream.poll`
returns the complete events already received (``select`` with a zero timeout, a
few microseconds when nothing is pending) so the index never answers from state
older than the last event charon has sent.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from vici.protocol import Packet

from ..core.errors import BackendError, DaemonDownError, ProtocolError
from .session import DEFAULT_TIMEOUT, Deadline, PacketBuffer, connect, decode_packet, frame, register, send_all

#: Bytes one :meth:`EventStream.poll` reads at most (a flooding daemon cannot keep it reading).
POLL_BUDGET = 4 << 20

SA_EVENTS = ("ike-updown", "ike-rekey", "child-updown", "child-rekey")


class EventStream:
    """A registered event connection. Raises ConnectionError once charon goes away."""

    def __init__(self, path: str, events: tuple[str, ...] = SA_EVENTS, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        deadline = Deadline(timeout, path)
        self.sock: socket.socket = connect(path, deadline)
        self._buf = PacketBuffer()
        self._early: list[tuple[str, dict[str, Any]]] = []
        try:
            for name in events:
                register(self.sock, name, True, deadline, self._early)
        except BackendError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise DaemonDownError(f"VICI event registration on {path} failed: {exc.strerror or exc}") from None
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def poll(self, timeout: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """Every complete event received so far (waiting up to ``timeout`` for the first)."""
        out, self._early = self._early, []
        out.extend(self._packets())  # complete packets a barrier() left in the buffer
        if not out and timeout > 0:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return out
        budget = POLL_BUDGET
        while budget > 0:  # with timeout 0 the first recv is the only syscall when nothing is pending
            try:
                chunk = self.sock.recv(min(budget, 1 << 20))
            except BlockingIOError:
                # Nothing more now. A packet charon is still writing stays buffered for the
                # next call: never wait for it here (charon's writer may be stalled behind
                # busy worker threads, and waiting could deadlock with our own caller).
                break
            if not chunk:
                raise ConnectionResetError("charon closed the VICI event connection")
            budget -= len(chunk)
            self._buf.feed(chunk)
            out.extend(self._packets())
        return out

    def barrier(self, timeout: float | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Every event charon raised before now: a ``version`` round trip on this connection.

        charon answers a command on the connection that carries the events, after every
        event it queued there before reading the command, so once the answer is in, all
        earlier events are too. One deadline (``timeout``, default the stream's) for all of it.
        """
        deadline = Deadline(self.timeout if timeout is None else timeout, self.path)
        pkt = Packet.request("version")
        try:
            send_all(self.sock, frame(pkt), deadline)
            out, self._early = self._early, []
            while True:
                raw = self._take_packet(deadline)
                kind, name, msg = decode_packet(raw)
                if kind == Packet.EVENT:
                    out.append((name, msg))
                elif kind == Packet.CMD_RESPONSE:
                    return out
                else:
                    raise ProtocolError(f"unexpected VICI packet type {kind} on the event connection")
        finally:
            self.sock.setblocking(False)

    def _take_packet(self, deadline: Deadline) -> bytes:
        while (raw := self._buf.pop()) is None:
            self.sock.settimeout(deadline.remaining("answer the barrier on the event connection"))
            try:
                chunk = self.sock.recv(self._buf.need())
            except TimeoutError:
                raise deadline.expired("answer the barrier on the event connection") from None
            if not chunk:
                raise ConnectionResetError("charon closed the VICI event connection")
            self._buf.feed(chunk)
        return raw

    def _packets(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        while (raw := self._buf.pop()) is not None:
            kind, name, msg = decode_packet(raw)
            if kind == Packet.EVENT:
                out.append((name, msg))
        return out
