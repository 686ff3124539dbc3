"""One VICI command connection to charon, thread-safe, bounded in time and memory.

Every request has a deadline for the whole operation: connecting, sending and every
byte of the reply (not a per-``recv`` timeout, which a daemon trickling one byte a
second defeats). No packet over charon's own message limit (512 KiB) is read; the
decoder is iterative with depth and element limits.

Errors (all :class:`~btns_vici.core.errors.BackendError` subclasses, see the README table):

* no daemon there (socket missing, nobody accepting): :class:`DaemonDownError` (ECONNREFUSED);
* not allowed to open the socket: :class:`DaemonAccessError` (EACCES, names the path and
  the access needed);
* the daemon does not complete the operation in time: :class:`DaemonTimeoutError` (ETIMEDOUT);
* a malformed, oversized or unexpected reply: :class:`ProtocolError` (EPROTO, says what);
* charon answered and reported failure: :class:`CommandFailedError` (EIO).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from vici.protocol import Message, Packet

from .. import forksafe
from ..core.errors import (
    BackendError,
    BtnsError,
    CommandFailedError,
    DaemonAccessError,
    DaemonDownError,
    DaemonTimeoutError,
    ProtocolError,
    access_problem,
)

DEFAULT_SOCKET = "/var/run/charon.vici"
HEADER = struct.Struct("!I")
#: charon's own limit (``vici message size ... exceeds maximum size of 524288, discarded``).
MAX_PACKET = 512 * 1024
#: charon nests sections at most ~6 deep (list-sas: entry / IKE_SA / child-sas / child / ...).
MAX_DEPTH = 16
#: Elements (section starts, key/values, list items) per message. A full 512 KiB list-sas
#: entry of ~1,950 CHILD_SAs holds ~60,000; the minimum wire size of an element (4 bytes)
#: bounds any message at ~131,000 anyway, this caps the decoded size below ~10 MB.
MAX_ELEMENTS = 80_000
#: Total wire bytes of one streamed listing kept in memory by :meth:`ViciSession.streamed`
#: (callers that can consume events one by one use :meth:`ViciSession.stream` instead).
MAX_STREAM = 64 << 20

#: Default deadline of a command, seconds (option ``timeout``, env ``BTNS_VICI_TIMEOUT``).
DEFAULT_TIMEOUT = 5.0
#: Streamed listings may take longer (charon needs 4.6 s for list-sas of 10,000 SAs): this
#: many times ``timeout`` unless ``list_timeout`` is given.
LIST_FACTOR = 6.0
#: Deadline of the probe of the default backend selection (option ``probe_timeout``).
PROBE_TIMEOUT = 1.0
TIMEOUT_ENV = "BTNS_VICI_TIMEOUT"


def seconds(value: Any, what: str) -> float:
    """A positive number of seconds from an option or the environment (EINVAL otherwise)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BtnsError(f"{what} must be a number of seconds, not {value!r}", errno.EINVAL) from None
    if not out > 0 or out == float("inf"):
        raise BtnsError(f"{what} must be a positive number of seconds, not {value!r}", errno.EINVAL)
    return out


def timeouts(options: Mapping[str, str]) -> tuple[float, float, float]:
    """(command, listing, probe) deadlines from ``timeout``/``list_timeout``/``probe_timeout`` and env."""
    raw = options.get("timeout") or os.environ.get(TIMEOUT_ENV)
    timeout = seconds(raw, "timeout" if options.get("timeout") else TIMEOUT_ENV) if raw else DEFAULT_TIMEOUT
    listing = seconds(options["list_timeout"], "list_timeout") if options.get("list_timeout") else timeout * LIST_FACTOR
    probe = (
        seconds(options["probe_timeout"], "probe_timeout")
        if options.get("probe_timeout")
        else (min(timeout, PROBE_TIMEOUT))
    )
    return timeout, listing, probe


class Deadline:
    """The end of one whole operation on a monotonic clock."""

    __slots__ = ("end", "path", "seconds")

    def __init__(self, seconds: float, path: str = "") -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.path = path

    def remaining(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired(what)
        return left

    def expired(self, what: str) -> DaemonTimeoutError:
        return DaemonTimeoutError(
            f"charon did not {what} within {self.seconds:g} s on VICI socket {self.path} "
            f"(deadline of the whole operation; option timeout / ${TIMEOUT_ENV})"
        )


def connect(path: str, deadline: Deadline | float) -> socket.socket:
    """A connected AF_UNIX stream socket to ``path`` within ``deadline`` (see module errors)."""
    if not isinstance(deadline, Deadline):
        deadline = Deadline(deadline, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            sock.settimeout(deadline.remaining("accept the connection"))
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:  # AF_UNIX: the listener's backlog is full (a stalled daemon)
                time.sleep(min(0.01, max(deadline.end - time.monotonic(), 0)))
            except TimeoutError:
                raise deadline.expired("accept the connection") from None
    except PermissionError as exc:
        sock.close()
        raise DaemonAccessError(
            f"not allowed to open VICI socket {path}: {access_problem(path)}", exc.errno or errno.EACCES
        ) from None
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        sock.close()
        raise DaemonDownError(f"charon does not answer on VICI socket {path}: {exc.strerror or exc}") from None
    except BtnsError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise DaemonDownError(f"cannot connect to VICI socket {path}: {exc.strerror or exc}") from None


def send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    sock.settimeout(deadline.remaining("take the request"))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise deadline.expired("take the request") from None


def recv_exact(sock: socket.socket, n: int, deadline: Deadline, started: bool = False) -> bytes:
    """Exactly ``n`` bytes before ``deadline``.

    The daemon closing before the first byte of a packet is ConnectionResetError (it went
    away: the caller may reconnect); closing inside a packet (``started`` or some bytes
    read) is a truncated reply, ProtocolError.
    """
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(deadline.remaining("send its whole reply"))
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 16))
        except TimeoutError:
            raise deadline.expired("send its whole reply") from None
        if not chunk:
            if started or buf:
                raise ProtocolError(f"truncated VICI reply: charon closed the connection after {len(buf)} of {n} bytes")
            raise ConnectionResetError(errno.ECONNRESET, "charon closed the VICI connection")
        buf += chunk
    return bytes(buf)


def check_length(length: int) -> None:
    """Refuse an empty or over-limit packet from its header alone (nothing of it is read)."""
    if length == 0:
        raise ProtocolError("VICI packet of length 0")
    if length > MAX_PACKET:
        raise ProtocolError(
            f"VICI packet of {length} bytes announced, over charon's own limit of {MAX_PACKET}: refused unread"
        )


def frame(packet: bytes) -> bytes:
    """One VICI packet on the wire: its 4-byte big-endian length, then the packet."""
    return HEADER.pack(len(packet)) + packet


class PacketBuffer:
    """VICI framing without I/O: stream bytes in (:meth:`feed`), whole packets out (:meth:`pop`).

    A packet's length is checked (:func:`check_length`) as soon as its header is in, so
    nothing of an empty or over-limit packet is ever waited for or kept.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def _length(self) -> int | None:
        if len(self._buf) < HEADER.size:
            return None
        length: int = HEADER.unpack_from(self._buf)[0]
        check_length(length)
        return length

    def need(self) -> int:
        """Bytes still missing before :meth:`pop` can return the next packet (0: it can now)."""
        length = self._length()
        if length is None:
            return HEADER.size - len(self._buf)
        return max(HEADER.size + length - len(self._buf), 0)

    def pop(self) -> bytes | None:
        """The next whole packet (without its header), or None until it is all in."""
        length = self._length()
        if length is None or len(self._buf) < HEADER.size + length:
            return None
        raw = bytes(self._buf[HEADER.size : HEADER.size + length])
        del self._buf[: HEADER.size + length]
        return raw


def recv_packet(sock: socket.socket, deadline: Deadline) -> bytes:
    """One whole packet from a blocking socket within ``deadline`` (header first, then exactly its length)."""
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size, deadline))
    check_length(length)
    return recv_exact(sock, length, deadline, started=True)


def register(
    sock: socket.socket, event: str, on: bool, deadline: Deadline, early: list[tuple[str, dict[str, Any]]] | None = None
) -> None:
    """(Un)register ``event`` on a command connection and wait for charon's confirmation.

    Events charon sends before the confirmation go to ``early`` ((name, message) pairs);
    without it they are dropped.
    """
    pkt = Packet.register_event(event) if on else Packet.unregister_event(event)
    send_all(sock, frame(pkt), deadline)
    while True:
        kind, name, msg = decode_packet(recv_packet(sock, deadline))
        if kind == Packet.EVENT:
            if early is not None:
                early.append((name, msg))
            continue
        if kind != Packet.EVENT_CONFIRM:
            raise ProtocolError(f"charon refused VICI event registration for {event!r} (packet type {kind})")
        return


def decode_message(payload: Any) -> dict[str, Any]:
    """A VICI message (bytes) -> nested dicts of bytes, lists of bytes.

    Strict (unlike ``vici.Message.deserialize``, which accepts truncated values) and
    bounded: iterative, at most :data:`MAX_DEPTH` nested sections and :data:`MAX_ELEMENTS`
    elements. Anything malformed raises ProtocolError saying what and where.
    """
    data = payload.read() if hasattr(payload, "read") else bytes(payload)
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"VICI message of {len(data)} bytes, over charon's limit of {MAX_PACKET}")
    root: dict[str, Any] = {}
    stack = [root]
    top = root  # stack[-1]
    pos, end, count = 0, len(data), 0
    section_start, section_end, key_value = Message.SECTION_START, Message.SECTION_END, Message.KEY_VALUE
    list_start, list_item, list_end = Message.LIST_START, Message.LIST_ITEM, Message.LIST_END
    names: dict[bytes, str] = {}  # element names repeat (every CHILD_SA has the same keys): checked once

    def fail(what: str) -> ProtocolError:
        return ProtocolError(f"malformed VICI message: {what} at byte {pos} of {end}")

    while pos < end:
        kind = data[pos]
        pos += 1
        count += 1
        if count > MAX_ELEMENTS:
            raise fail(f"more than {MAX_ELEMENTS} elements")
        if kind == section_end:
            if len(stack) == 1:
                raise fail("unbalanced section end")
            stack.pop()
            top = stack[-1]
            continue
        if kind != key_value and kind != section_start and kind != list_start:
            raise fail(f"bad element type {kind}")
        if pos >= end:
            raise fail("truncated name")
        n = data[pos]
        if pos + 1 + n > end:
            raise fail("truncated name")
        raw = data[pos + 1 : pos + 1 + n]
        pos += 1 + n
        key = names.get(raw)
        if key is None:
            if not raw.isascii():
                raise fail("element name is not ASCII")
            key = names[raw] = raw.decode("ascii")
        if kind == key_value:
            if pos + 2 > end:
                raise fail("truncated value length")
            vlen = (data[pos] << 8) | data[pos + 1]
            if pos + 2 + vlen > end:
                raise fail("truncated value")
            top[key] = data[pos + 2 : pos + 2 + vlen]
            pos += 2 + vlen
        elif kind == section_start:
            if len(stack) > MAX_DEPTH:
                raise fail(f"sections nested deeper than {MAX_DEPTH}")
            sec: dict[str, Any] = {}
            top[key] = sec
            stack.append(sec)
            top = sec
        else:
            items: list[bytes] = []
            while True:
                if pos >= end:
                    raise fail("unterminated list")
                marker = data[pos]
                pos += 1
                if marker == list_end:
                    break
                if marker != list_item:
                    raise fail(f"bad list element {marker}")
                count += 1
                if count > MAX_ELEMENTS:
                    raise fail(f"more than {MAX_ELEMENTS} elements")
                if pos + 2 > end:
                    raise fail("truncated list item length")
                vlen = (data[pos] << 8) | data[pos + 1]
                if pos + 2 + vlen > end:
                    raise fail("truncated list item")
                items.append(data[pos + 2 : pos + 2 + vlen])
                pos += 2 + vlen
            top[key] = items
    if len(stack) != 1:
        raise ProtocolError("malformed VICI message: unterminated section")
    return root


def decode_packet(raw: bytes) -> tuple[int, str, dict[str, Any]]:
    """(packet type, event name or "", message) of one VICI packet."""
    if not raw:
        raise ProtocolError("empty VICI packet")
    kind, body = raw[0], raw[1:]
    name = ""
    if kind == Packet.EVENT:
        if not body or len(body) < 1 + body[0]:
            raise ProtocolError("VICI event packet with a truncated name")
        rawname, body = body[1 : 1 + body[0]], body[1 + body[0] :]
        if not rawname.isascii():
            raise ProtocolError("VICI event name is not ASCII")
        name = rawname.decode("ascii")
    elif kind not in (Packet.CMD_RESPONSE, Packet.CMD_UNKNOWN, Packet.EVENT_CONFIRM, Packet.EVENT_UNKNOWN):
        raise ProtocolError(f"unexpected VICI packet type {kind}")
    if kind in (Packet.CMD_RESPONSE, Packet.EVENT):
        return kind, name, decode_message(body)
    return kind, name, {}


EventSink = Callable[[dict[str, Any]], None]


#: One listing at a time per charon in this process (every session to that socket path). charon
#: formats traffic selectors with getprotobynumber() and getservbyport() (libstrongswan
#: traffic_selector.c, the %R printf hook), which are not reentrant: two listings built at once in
#: charon's worker threads garble each other's selectors (measured: ``list-sas`` beside
#: ``list-conns`` on a second connection returned the protocol "tcp\t6\tTCP\t\t# transmission
#: control protocol\n", a raw /etc/protocols line). README "Known limits of charon".
#: (Reentrant: a sink that lists again from inside a listing waits for nobody.)
_listings: dict[str, threading.RLock] = {}
_listings_guard = threading.Lock()


def _listing_lock(path: str) -> threading.RLock:
    with _listings_guard:
        lock = _listings.get(path)
        if lock is None:
            lock = _listings[path] = threading.RLock()
        return lock


@forksafe.in_child
def _forget_listing_locks() -> None:
    """In a forked child: another thread of the parent may have held one at the fork."""
    global _listings_guard
    _listings.clear()
    _listings_guard = threading.Lock()


class ViciSession:
    """Commands to one charon; reconnects once when charon restarted in between.

    ``timeout``: deadline of a whole command, seconds; ``list_timeout``: of a streamed
    listing (default :data:`LIST_FACTOR` times ``timeout``).
    """

    def __init__(
        self, path: str = DEFAULT_SOCKET, timeout: float = DEFAULT_TIMEOUT, list_timeout: float | None = None
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.list_timeout = list_timeout if list_timeout is not None else timeout * LIST_FACTOR
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

    def _exchange(
        self, packet: bytes, stream_event: str | None, sink: EventSink | None, deadline: Deadline
    ) -> dict[str, Any]:
        if self._sock is None:
            self._sock = connect(self.path, deadline)
        sock = self._sock
        if stream_event:
            register(sock, stream_event, True, deadline)
        send_all(sock, frame(packet), deadline)
        while True:
            kind, name, msg = decode_packet(recv_packet(sock, deadline))
            if kind == Packet.EVENT:
                if stream_event and name == stream_event and sink is not None:
                    sink(msg)
                continue
            if kind == Packet.CMD_UNKNOWN:
                raise ProtocolError("charon does not know this VICI command")
            if kind != Packet.CMD_RESPONSE:
                raise ProtocolError(f"unexpected VICI packet type {kind} in a command reply")
            break
        if stream_event:
            register(sock, stream_event, False, deadline)
        return msg

    def call(
        self,
        command: str,
        message: Mapping[str, Any] | None = None,
        stream_event: str | None = None,
        sink: EventSink | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``command`` within one deadline; its reply. Streamed ``stream_event`` messages go to ``sink``.

        Retries once (within the same deadline) when the connection was dropped in between.
        """
        body = Message.serialize(dict(message)) if message else None
        packet = Packet.request(command, body)
        if timeout is None:
            timeout = self.list_timeout if stream_event else self.timeout
        deadline = Deadline(timeout, self.path)
        serial = _listing_lock(self.path) if stream_event else None
        if serial is not None and not serial.acquire(timeout=deadline.remaining("start the listing")):
            raise deadline.expired(f"start {command} (another listing of this process was in progress)")
        try:
            with self._lock:
                return self._call(packet, stream_event, sink, deadline)
        finally:
            if serial is not None:
                serial.release()

    def _call(
        self, packet: bytes, stream_event: str | None, sink: EventSink | None, deadline: Deadline
    ) -> dict[str, Any]:
        for attempt in (0, 1):
            fresh = self._sock is None
            try:
                return self._exchange(packet, stream_event, sink, deadline)
            except BackendError:
                self._drop()  # the connection is mid-reply or out of step: never reuse it
                raise
            except OSError as exc:
                self._drop()
                if attempt or fresh:
                    raise DaemonDownError(f"VICI connection to {self.path} failed: {exc.strerror or exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check(command: str, reply: Mapping[str, Any]) -> None:
        ok = reply.get("success", b"yes")
        if ok != b"yes":
            if not isinstance(ok, bytes) or ok != b"no":
                raise ProtocolError(f"VICI {command} reply has a bad 'success' value")
            err = reply.get("errmsg", b"")
            err = err.decode(errors="replace") if isinstance(err, bytes) else "(bad errmsg)"
            raise CommandFailedError(f"VICI {command} failed: {err}")

    def request(
        self, command: str, message: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """A plain command; CommandFailedError (EIO) when charon reports failure."""
        reply = self.call(command, message, timeout=timeout)
        self._check(command, reply)
        return reply

    def stream(
        self, command: str, event: str, message: Mapping[str, Any] | None, sink: EventSink, timeout: float | None = None
    ) -> dict[str, Any]:
        """A listing command whose ``event`` messages are handed to ``sink`` one by one as they arrive."""
        reply = self.call(command, message, event, sink, timeout)
        self._check(command, reply)
        return reply

    def streamed(
        self, command: str, event: str, message: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """A listing command's ``event`` messages, collected (at most :data:`MAX_STREAM` wire bytes)."""
        out: list[dict[str, Any]] = []
        budget = [MAX_STREAM // 4]  # elements, each at least 4 wire bytes

        def keep(msg: dict[str, Any]) -> None:
            budget[0] -= _weight(msg)
            if budget[0] < 0:
                raise ProtocolError(f"VICI {command} streamed more than {MAX_STREAM // 4} elements")
            out.append(msg)

        self.stream(command, event, message, keep, timeout)
        return out

    # the listings the backend needs ------------------------------------------------------------
    def list_sas(
        self,
        ike_id: int | str | None = None,
        child_id: int | str | None = None,
        ike: str | None = None,
        child: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.streamed("list-sas", "list-sa", sas_filter(ike_id, child_id, ike, child))

    def list_conns(self, ike: str | None = None) -> list[dict[str, Any]]:
        return self.streamed("list-conns", "list-conn", {"ike": ike} if ike else None)

    def list_certs(self, cert_type: str | None = None) -> list[dict[str, Any]]:
        return self.streamed("list-certs", "list-cert", {"type": cert_type} if cert_type else None)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")


def sas_filter(
    ike_id: int | str | None = None, child_id: int | str | None = None, ike: str | None = None, child: str | None = None
) -> dict[str, str] | None:
    """The list-sas filter message (charon accepts ``ike``, ``ike-id``, ``child``, ``child-id``)."""
    msg = {}
    if ike_id is not None:
        msg["ike-id"] = str(ike_id)
    if child_id is not None:
        msg["child-id"] = str(child_id)
    if ike is not None:
        msg["ike"] = ike
    if child is not None:
        msg["child"] = child
    return msg or None


def _weight(msg: Mapping[str, Any]) -> int:
    """Elements of a decoded message (iterative)."""
    total, todo = 0, [msg]
    while todo:
        sec = todo.pop()
        for v in sec.values():
            total += 1
            if isinstance(v, dict):
                todo.append(v)
            elif isinstance(v, list):
                total += len(v)
    return total


def decode_bytes(data: bytes) -> dict[str, Any]:
    """A serialized VICI message (as stored under tests/data/vici) -> nested dicts of bytes."""
    return decode_message(data)


def encode_message(message: Mapping[str, Any]) -> bytes:
    """The VICI wire encoding of a message (inverse of :func:`decode_bytes`)."""
    return bytes(Message.serialize(dict(message)))
