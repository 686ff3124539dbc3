"""One VICI command connection to charon, thread-safe, reconnecting once on failure.

Errors follow :mod:`btns_vici.hookspecs`: a daemon that does not answer is a
:class:`~btns_vici.errors.BackendError` (ECONNREFUSED), a reply that does not
parse is a :class:`~btns_vici.errors.ProtocolError` (EPROTO).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

from vici.protocol import Message, Packet

from ..errors import BackendError, ProtocolError

DEFAULT_SOCKET = "/var/run/charon.vici"
HEADER = struct.Struct("!I")
MAX_PACKET = 1 << 24  # charon's own limit is 512 KiB per segment; guard against garbage


def connect(path: str, timeout: float) -> socket.socket:
    """A connected AF_UNIX stream socket to ``path`` or BackendError (ECONNREFUSED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise BackendError(f"charon does not answer on VICI socket {path}: {exc.strerror or exc}") from exc
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("VICI connection closed by charon")
        buf += chunk
    return bytes(buf)


def recv_packet(sock: socket.socket) -> bytes:
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if length == 0 or length > MAX_PACKET:
        raise ProtocolError(f"VICI packet of bad length {length}")
    return recv_exact(sock, length)


def decode_message(payload: Any) -> dict[str, Any]:
    """A VICI message (bytes, or the stream after the packet header) -> nested dicts of bytes.

    Strict, unlike ``vici.Message.deserialize`` (which accepts truncated values):
    anything malformed raises ProtocolError.
    """
    data = payload.read() if hasattr(payload, "read") else bytes(payload)
    root: dict[str, Any] = {}
    stack = [root]
    pos, end = 0, len(data)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise ProtocolError("truncated VICI message")
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def name() -> str:
        raw = take(take(1)[0])
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError("VICI element name is not ASCII") from exc

    def value() -> bytes:
        return take(int.from_bytes(take(2), "big"))

    while pos < end:
        kind = take(1)[0]
        if kind == Message.SECTION_START:
            sec: dict[str, Any] = {}
            stack[-1][name()] = sec
            stack.append(sec)
        elif kind == Message.SECTION_END:
            if len(stack) == 1:
                raise ProtocolError("unbalanced VICI section end")
            stack.pop()
        elif kind == Message.KEY_VALUE:
            key = name()
            stack[-1][key] = value()
        elif kind == Message.LIST_START:
            key = name()
            items = []
            while (marker := take(1)[0]) == Message.LIST_ITEM:
                items.append(value())
            if marker != Message.LIST_END:
                raise ProtocolError(f"bad VICI list element {marker}")
            stack[-1][key] = items
        else:
            raise ProtocolError(f"bad VICI element type {kind}")
    if len(stack) != 1:
        raise ProtocolError("unterminated VICI section")
    return root


def decode_packet(raw: bytes) -> tuple[int, str, dict[str, Any]]:
    """(packet type, event name or "", message) of one VICI packet."""
    try:
        parsed = Packet.parse(raw)
        name = ""
        if parsed.response_type == Packet.EVENT:
            name = parsed.event_type.decode("ascii")
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed VICI packet: {exc}") from exc
    kind = parsed.response_type
    if kind in (Packet.CMD_RESPONSE, Packet.EVENT):
        return kind, name, decode_message(parsed.payload)
    return kind, name, {}


class ViciSession:
    """Commands to one charon; reconnects once when charon restarted in between."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _exchange(self, packet: bytes, stream_event: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if self._sock is None:
            self._sock = connect(self.path, self.timeout)
        sock = self._sock
        events: list[dict[str, Any]] = []
        if stream_event:
            self._register(sock, stream_event, True)
        sock.sendall(HEADER.pack(len(packet)) + packet)
        while True:
            kind, _name, msg = decode_packet(recv_packet(sock))
            if kind == Packet.EVENT:
                events.append(msg)
                continue
            if kind == Packet.CMD_UNKNOWN:
                raise ProtocolError("charon does not know this VICI command")
            if kind != Packet.CMD_RESPONSE:
                raise ProtocolError(f"unexpected VICI packet type {kind}")
            break
        if stream_event:
            self._register(sock, stream_event, False)
        return events, msg

    @staticmethod
    def _register(sock: socket.socket, event: str, on: bool) -> None:
        pkt = Packet.register_event(event) if on else Packet.unregister_event(event)
        sock.sendall(HEADER.pack(len(pkt)) + pkt)
        kind, _, _ = decode_packet(recv_packet(sock))
        if kind != Packet.EVENT_CONFIRM:
            raise ProtocolError(f"charon refused VICI event registration for {event!r} ({kind})")

    def call(
        self, command: str, message: Mapping[str, Any] | None = None, stream_event: str | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run ``command``; returns (streamed events, reply). Retries once on a dropped connection."""
        body = Message.serialize(dict(message)) if message else None
        packet = Packet.request(command, body)
        with self._lock:
            for attempt in (0, 1):
                try:
                    return self._exchange(packet, stream_event)
                except ProtocolError:
                    self._drop()
                    raise
                except BackendError:
                    raise
                except OSError as exc:
                    self._drop()
                    if attempt:
                        raise BackendError(f"VICI connection to {self.path} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def request(self, command: str, message: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A plain command; raises BackendError when charon reports failure."""
        _, reply = self.call(command, message)
        if reply.get("success", b"yes") != b"yes":
            err = reply.get("errmsg", b"").decode(errors="replace")
            raise BackendError(f"VICI {command} failed: {err}")
        return reply

    def streamed(self, command: str, event: str, message: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """A listing command that streams its answer as ``event`` messages."""
        events, reply = self.call(command, message, event)
        if reply.get("success", b"yes") != b"yes":
            err = reply.get("errmsg", b"").decode(errors="replace")
            raise BackendError(f"VICI {command} failed: {err}")
        return events

    # the listings the backend needs ------------------------------------------------------------
    def list_sas(self, ike_id: int | None = None) -> list[dict[str, Any]]:
        return self.streamed("list-sas", "list-sa", {"ike-id": str(ike_id)} if ike_id is not None else None)

    def list_conns(self, ike: str | None = None) -> list[dict[str, Any]]:
        return self.streamed("list-conns", "list-conn", {"ike": ike} if ike else None)

    def list_certs(self, cert_type: str | None = None) -> list[dict[str, Any]]:
        return self.streamed("list-certs", "list-cert", {"type": cert_type} if cert_type else None)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")


def decode_bytes(data: bytes) -> dict[str, Any]:
    """A serialized VICI message (as stored under tests/data/vici) -> nested dicts of bytes."""
    return decode_message(data)


def encode_message(message: Mapping[str, Any]) -> bytes:
    """The VICI wire encoding of a message (inverse of :func:`decode_bytes`)."""
    return bytes(Message.serialize(dict(message)))
