"""The btnsd wire protocol (README "btnsd: the broker"), sans I/O: frames and token codecs. Pure.

Transport: a unix SOCK_SEQPACKET socket, one request or one response per packet. A packet
is one frame::

    magic "BT" (2 bytes) | version (1 byte, 1) | kind (1 byte: 1 request, 2 response, 3 notification)
    | id (4 bytes, big-endian: a response carries its request's) | length (4 bytes, big-endian,
    = the rest of the packet) | payload (UTF-8 JSON object)

at most :data:`MAX_FRAME` bytes in all. A request that concerns a socket carries that socket
itself as exactly one SCM_RIGHTS descriptor in the same packet: possession of the descriptor
is the authority to ask about it or to make demands for it. The broker never answers for a
socket it did not receive.

Request payload: ``{"op": NAME, ...arguments}``; response payload: ``{"ok": true, "result":
{...}}`` or ``{"ok": false, "errno": INT, "errname": "EACCES", "error": TEXT}``. (The id lives in
the header so that the same answer is the same bytes: both ends cache on them.) pTokens travel as
``{"attrs": {NAME: HEX}, "local_ts": [...], "remote_ts": [...]}``, each attribute in the draft's C form (the bytes
``ipsec_get_token_attr`` returns), iTokens in their canonical serialized form.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import struct
from collections.abc import Mapping
from typing import Any

from ..core.constants import Attr
from ..core.derive import restored_ptoken
from ..core.errors import BtnsError
from ..core.selectors import TrafficSelector
from ..core.tokens import PToken, decode_attr, encode_attr

MAGIC = b"BT"
VERSION = 1
REQUEST, RESPONSE, NOTIFY = 1, 2, 3
HEADER = struct.Struct("!2sBBII")
MAX_FRAME = 64 * 1024
MAX_DEPTH = 8
MAX_SELECTORS = 256

#: op -> does it need the socket's descriptor
OPS = {
    "hello": False,
    "get_socket_ptoken": True,
    "set_socket_ptoken": True,
    "get_msg_ptoken": True,
    "check_send": True,
    "prepare_connect": True,
    "prepare_listen": True,
    "verify": True,
    "sockets": True,
    "latch": True,
    "unlatch": False,
    "watch": False,
}


#: The hot request, get_socket_ptoken with no arguments, as its exact payload bytes: both ends
#: skip JSON for it (the client sends these bytes, the broker compares instead of parsing).
HOT_BODY = b'{"op":"get_socket_ptoken"}'
HOT_REQUEST: dict[str, Any] = {"op": "get_socket_ptoken"}


class FrameError(BtnsError):
    """A frame that is not a valid btnsd frame (EPROTO)."""

    default_errno = errno.EPROTO


def body_of(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()


def frame(kind: int, ident: int, body: bytes) -> bytes:
    if HEADER.size + len(body) > MAX_FRAME:
        raise FrameError(f"frame of {HEADER.size + len(body)} bytes exceeds {MAX_FRAME}", errno.EMSGSIZE)
    return HEADER.pack(MAGIC, VERSION, kind, ident & 0xFFFFFFFF, len(body)) + body


def encode(kind: int, ident: int, payload: Mapping[str, Any]) -> bytes:
    return frame(kind, ident, body_of(payload))


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level)
    return level


def decode(packet: bytes, want: int) -> tuple[int, dict[str, Any]]:
    """(id, payload) of one packet of kind ``want``, or FrameError saying what is wrong."""
    ident, body = split(packet, want)
    return ident, parse_body(body)


def split(packet: bytes, want: int) -> tuple[int, bytes]:
    """(id, raw payload) of one packet of kind ``want``: the header checked, the payload not yet parsed."""
    if len(packet) < HEADER.size:
        raise FrameError(f"frame of {len(packet)} bytes is shorter than its {HEADER.size}-byte header")
    if len(packet) > MAX_FRAME:
        raise FrameError(f"frame of {len(packet)} bytes exceeds {MAX_FRAME}")
    magic, version, kind, ident, length = HEADER.unpack_from(packet)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(
            f"protocol version {version} is not supported (this side speaks {VERSION})", errno.EPROTONOSUPPORT
        )
    if kind != want:
        raise FrameError(f"frame kind {kind}, expected {want}")
    if length != len(packet) - HEADER.size:
        raise FrameError(f"frame length {length} does not match the {len(packet) - HEADER.size} bytes that follow")
    return ident, bytes(packet[HEADER.size :])


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise FrameError("payload is not a JSON object")
    if _depth(payload) > MAX_DEPTH:
        raise FrameError(f"payload nests deeper than {MAX_DEPTH}")
    return payload


def request(op: str, ident: int, **args: Any) -> bytes:
    if op == "get_socket_ptoken" and not args:
        return frame(REQUEST, ident, HOT_BODY)  # the same bytes body_of would make, without JSON
    return encode(REQUEST, ident, {"op": op, **args})


def notify(payload: Mapping[str, Any]) -> bytes:
    """A notification frame (kind 3, id 0) on a connection that asked to ``watch``."""
    return encode(NOTIFY, 0, payload)


def ok_body(result: Mapping[str, Any]) -> bytes:
    return body_of({"ok": True, "result": dict(result)})


def ok(ident: int, result: Mapping[str, Any]) -> bytes:
    return frame(RESPONSE, ident, ok_body(result))


def error(ident: int, exc: OSError) -> bytes:
    code = exc.errno or errno.EIO
    name = errno.errorcode.get(code, str(code))
    text = str(exc.strerror or exc)[:2000]
    return encode(RESPONSE, ident, {"ok": False, "errno": code, "errname": name, "error": text})


# ---- pTokens ---------------------------------------------------------------------------------


def ptoken_to_wire(tok: PToken) -> dict[str, Any]:
    return {
        "attrs": {attr.name: encode_attr(attr, value).hex() for attr, value in tok.attributes().items()},
        "local_ts": [_ts(t) for t in tok.local_ts],
        "remote_ts": [_ts(t) for t in tok.remote_ts],
    }


def _ts(t: TrafficSelector) -> list[Any]:
    return [str(t.start), str(t.end), t.proto, t.port_lo, t.port_hi]


def ptoken_from_wire(data: Any, *, trusted: bool) -> PToken:
    """The pToken ``data`` describes; every value validated (EINVAL for anything malformed).

    ``trusted`` (an answer from the broker) also fills the read-only attributes
    (informationString); a client's demand may only set what an application may set.
    """
    if not isinstance(data, dict) or not isinstance(data.get("attrs"), dict):
        raise BtnsError("pToken must be an object with 'attrs'", errno.EINVAL)
    tok = PToken()
    derived: dict[Attr, Any] = {}
    for name, hexed in data["attrs"].items():
        attr = Attr.__members__.get(name) if isinstance(name, str) else None
        if attr is None or not isinstance(hexed, str) or len(hexed) > 2 * MAX_FRAME:
            raise BtnsError(f"unknown or malformed pToken attribute {name!r}", errno.EINVAL)
        try:
            raw = bytes.fromhex(hexed)
        except ValueError:
            raise BtnsError(f"pToken attribute {name} is not hex", errno.EINVAL) from None
        if trusted:
            derived[attr] = _decoded(attr, raw)
        else:
            tok.set_attr_bytes(int(attr), raw)  # the application's own rules: read-only refused
    selectors: dict[str, tuple[TrafficSelector, ...]] = {}
    for side in ("local_ts", "remote_ts"):
        items = data.get(side, [])
        if not isinstance(items, list) or len(items) > MAX_SELECTORS:
            raise BtnsError(f"pToken {side} must be a list of at most {MAX_SELECTORS}", errno.EINVAL)
        try:
            sels = tuple(
                TrafficSelector(ipaddress.ip_address(a), ipaddress.ip_address(b), int(p), int(lo), int(hi))
                for a, b, p, lo, hi in items
            )
        except (TypeError, ValueError) as exc:
            raise BtnsError(f"pToken {side} malformed: {exc}", errno.EINVAL) from None
        selectors[side] = sels
    if trusted:
        return restored_ptoken(derived, selectors["local_ts"], selectors["remote_ts"])
    tok.local_ts, tok.remote_ts = selectors["local_ts"], selectors["remote_ts"]
    return tok


@functools.lru_cache(maxsize=1024)
def _decoded_memo(attr: Attr, raw: bytes) -> Any:
    return decode_attr(attr, raw)


def _decoded(attr: Attr, raw: bytes) -> Any:
    """decode_attr, memoized: the same peer's iToken arrives with every answer (copies are handed out)."""
    value = _decoded_memo(attr, raw)
    return value.copy() if hasattr(value, "copy") else value


def raise_for(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The result of a response payload, or the OSError it carries."""
    result = payload.get("result")
    if payload.get("ok") is True and isinstance(result, dict):
        return result
    code = payload.get("errno")
    if not isinstance(code, int) or not 0 < code < 4096:
        raise FrameError("malformed error response")
    raise BtnsError(str(payload.get("error", ""))[:2000] or errno.errorcode.get(code, "error"), code)
