"""XFRM netlink wire format (``linux/xfrm.h``) <-> records. Pure: bytes in, records out.

Layouts are checked against the UAPI header's sizes (see the tests). Netlink fields are
host byte order except ports and SPIs, which are big-endian on the wire. Anything
malformed or unknown is skipped with a :class:`XfrmDecodeWarning`, never raised.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import warnings
from collections.abc import Iterator, Sequence

from ..core.selectors import IPAddress
from ._records import (
    EVENT_KINDS,
    Acquire,
    Algorithm,
    Current,
    Encap,
    Lifetime,
    Mark,
    Selector,
    Stats,
    Template,
    XfrmEvent,
    XfrmPolicy,
    XfrmState,
)


class XfrmDecodeWarning(UserWarning):
    """A netlink message or attribute was malformed or unknown and has been skipped."""


# struct layouts; "=" is native byte order without implicit padding, so every pad is explicit.
SELECTOR = struct.Struct("=16s16s8sHBBB3xiI")  # the 8 port bytes are big-endian: decoded by _PORTS
_PORTS = struct.Struct("!HHHH")  # dport, dport_mask, sport, sport_mask
XFRM_ID = struct.Struct("=16s4sB3x")  # daddr, spi (big-endian), proto
LIFETIME_CFG = struct.Struct("=8Q")
LIFETIME_CUR = struct.Struct("=4Q")
STATS = struct.Struct("=3I")
USERSA_INFO = struct.Struct(f"={SELECTOR.size}s{XFRM_ID.size}s16s64s32s12sIIHBBB7x")
USERPOLICY_INFO = struct.Struct(f"={SELECTOR.size}s64s32sIIBBBB4x")
USER_TMPL = struct.Struct(f"={XFRM_ID.size}sH2x16sIBBBxIII")
USER_ACQUIRE = struct.Struct(f"={XFRM_ID.size}s16s{SELECTOR.size}s{USERPOLICY_INFO.size}sIIII")
USER_EXPIRE = struct.Struct(f"={USERSA_INFO.size}sB7x")
USER_POLEXPIRE = struct.Struct(f"={USERPOLICY_INFO.size}sB7x")
USERSA_ID = struct.Struct("=16s4sHBx")
USERPOLICY_ID = struct.Struct(f"={SELECTOR.size}sIB3x")
ALGO = struct.Struct("=64sI")  # xfrm_algo: name, key_len (bits), key follows
ALGO_LEN = struct.Struct("=64sII")  # xfrm_algo_auth (trunc_len) and xfrm_algo_aead (icv_len)
ENCAP_TMPL = struct.Struct("=H2s2s2x16s")  # type, sport, dport (big-endian)
MARK = struct.Struct("=II")
U32 = struct.Struct("=I")
_USERSA_FLUSH = struct.Struct("=B")  # xfrm_usersa_flush: proto
NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")

# XFRMA_* attribute types that are decoded, and known ones that are deliberately ignored.
XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ALG_COMP, XFRMA_ENCAP, XFRMA_TMPL, XFRMA_SA, XFRMA_POLICY = range(1, 8)
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_IF_ID = 31
XFRMA_SA_DIR = 34
_IGNORED = {0, 8, 9, 10, 11, 12, 13, 14, 15, 17, 19, 22, 23, 24, 25, 26, 27, 28, 29, 30, 32, 33, *range(35, 43)}

XFRM_MSG_GETSA = 18
XFRM_MSG_GETPOLICY = 21


def _warn(message: str) -> None:
    warnings.warn(message, XfrmDecodeWarning, stacklevel=3)


def _addr(raw: bytes, family: int) -> IPAddress:
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(raw[:16])
    return ipaddress.IPv4Address(raw[:4])


def _be32(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def decode_selector(raw: bytes, default_family: int = 0) -> Selector:
    """``struct xfrm_selector``; an SA's selector may leave its family 0: then the SA's applies."""
    daddr, saddr, _, family, plen_d, plen_s, proto, ifindex, user = SELECTOR.unpack(raw)
    dport, dport_mask, sport, sport_mask = _PORTS.unpack_from(raw, 32)
    afam = family or default_family
    return Selector(
        family,
        _addr(saddr, afam),
        _addr(daddr, afam),
        plen_s,
        plen_d,
        sport,
        sport_mask,
        dport,
        dport_mask,
        proto,
        ifindex,
        user,
    )


def decode_template(raw: bytes) -> Template:
    xid, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos = USER_TMPL.unpack(raw)
    daddr, spi, proto = XFRM_ID.unpack(xid)
    return Template(
        family,
        _addr(daddr, family),
        _addr(saddr, family),
        _be32(spi),
        proto,
        mode,
        reqid,
        share,
        bool(optional),
        aalgos,
        ealgos,
        calgos,
    )


def decode_algorithm(kind: str, raw: bytes) -> Algorithm:
    """Name and key length of ``struct xfrm_algo[_auth|_aead]``; the key bytes are not read."""
    if kind in ("auth", "aead"):
        name, key_bits, extra = ALGO_LEN.unpack_from(raw)
        trunc, icv = (extra, None) if kind == "auth" else (None, extra)
    else:
        (name, key_bits), trunc, icv = ALGO.unpack_from(raw), None, None
    return Algorithm(kind, name.split(b"\0", 1)[0].decode("ascii", "replace"), key_bits, trunc, icv)


def iter_attributes(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute; a malformed tail is skipped with a warning."""
    off = 0
    while off + NLATTR.size <= len(raw):
        length, atype = NLATTR.unpack_from(raw, off)
        if length < NLATTR.size or off + length > len(raw):
            if not any(raw[off:]):  # zero padding, not an attribute
                return
            _warn(f"malformed netlink attribute (type {atype}, length {length}) at offset {off}: skipped")
            return
        yield atype & 0x3FFF, raw[off + NLATTR.size : off + length]  # strip NLA_F_NESTED/BYTEORDER
        off += (length + 3) & ~3
    if off < len(raw) and any(raw[off:]):
        _warn(f"{len(raw) - off} trailing bytes after netlink attributes: skipped")


class _Attrs:
    """What the attributes of one SA/policy message say, decoded leniently."""

    _SIZES = {
        XFRMA_ENCAP: ENCAP_TMPL.size,
        XFRMA_MARK: MARK.size,
        XFRMA_IF_ID: U32.size,
        XFRMA_POLICY_TYPE: 1,
        XFRMA_SA: USERSA_INFO.size,
        XFRMA_POLICY: USERPOLICY_INFO.size,
        XFRMA_SA_DIR: 1,
        XFRMA_ALG_CRYPT: ALGO.size,
        XFRMA_ALG_AUTH: ALGO.size,
        XFRMA_ALG_COMP: ALGO.size,
        XFRMA_ALG_AUTH_TRUNC: ALGO_LEN.size,
        XFRMA_ALG_AEAD: ALGO_LEN.size,
        XFRMA_TMPL: 0,
    }
    _ALGS = {
        XFRMA_ALG_CRYPT: "crypt",
        XFRMA_ALG_AUTH: "auth",
        XFRMA_ALG_AUTH_TRUNC: "auth",
        XFRMA_ALG_AEAD: "aead",
        XFRMA_ALG_COMP: "comp",
    }

    def __init__(self, raw: bytes) -> None:
        self.algorithms: dict[str, Algorithm] = {}
        self.templates: tuple[Template, ...] = ()
        self.encap: Encap | None = None
        self.mark: Mark | None = None
        self.if_id = self.policy_type = self.sa_dir = 0
        self.sa: bytes | None = None
        self.policy: bytes | None = None
        for atype, payload in iter_attributes(raw):
            if atype in _IGNORED:
                continue
            if atype not in self._SIZES:
                _warn(f"unknown XFRM attribute type {atype} ({len(payload)} bytes): skipped")
                continue
            if len(payload) < self._SIZES[atype]:
                _warn(f"XFRM attribute type {atype} too short ({len(payload)} bytes): skipped")
                continue
            self._take(atype, payload)

    def _take(self, atype: int, payload: bytes) -> None:
        if atype in self._ALGS:
            kind = self._ALGS[atype]
            # XFRMA_ALG_AUTH_TRUNC supersedes XFRMA_ALG_AUTH, whichever comes first.
            if kind != "auth" or atype == XFRMA_ALG_AUTH_TRUNC or "auth" not in self.algorithms:
                self.algorithms[kind] = decode_algorithm(kind, payload)
        elif atype == XFRMA_TMPL:
            n, rest = divmod(len(payload), USER_TMPL.size)
            if rest:
                _warn(f"XFRMA_TMPL length {len(payload)} is not a multiple of {USER_TMPL.size}: tail skipped")
            self.templates = tuple(
                decode_template(payload[i * USER_TMPL.size : (i + 1) * USER_TMPL.size]) for i in range(n)
            )
        elif atype == XFRMA_ENCAP:
            etype, sport, dport, oa = ENCAP_TMPL.unpack_from(payload)
            oa_addr = None if not any(oa) else _addr(oa, socket.AF_INET6 if any(oa[4:]) else socket.AF_INET)
            self.encap = Encap(etype, _be32(sport), _be32(dport), oa_addr)
        elif atype == XFRMA_MARK:
            self.mark = Mark(*MARK.unpack_from(payload))
        elif atype == XFRMA_IF_ID:
            (self.if_id,) = U32.unpack_from(payload)
        elif atype == XFRMA_POLICY_TYPE:
            self.policy_type = payload[0]
        elif atype == XFRMA_SA_DIR:
            self.sa_dir = payload[0]
        elif atype == XFRMA_SA:
            self.sa = payload[: USERSA_INFO.size]
        elif atype == XFRMA_POLICY:
            self.policy = payload[: USERPOLICY_INFO.size]


_ALG_ORDER = ("aead", "crypt", "auth", "comp")


def decode_state(info: bytes, attrs: _Attrs) -> XfrmState:
    sel, xid, saddr, lft, cur, stats, seq, reqid, family, mode, replay_window, flags = USERSA_INFO.unpack(info)
    daddr, spi, proto = XFRM_ID.unpack(xid)
    return XfrmState(
        sel=decode_selector(sel, family),
        daddr=_addr(daddr, family),
        saddr=_addr(saddr, family),
        spi=_be32(spi),
        proto=proto,
        family=family,
        mode=mode,
        reqid=reqid,
        seq=seq,
        replay_window=replay_window,
        flags=flags,
        lifetime=Lifetime(*LIFETIME_CFG.unpack(lft)),
        current=Current(*LIFETIME_CUR.unpack(cur)),
        stats=Stats(*STATS.unpack(stats)),
        algorithms=tuple(attrs.algorithms[k] for k in _ALG_ORDER if k in attrs.algorithms),
        encap=attrs.encap,
        mark=attrs.mark,
        if_id=attrs.if_id,
        direction=attrs.sa_dir,
    )


def decode_policy(info: bytes, attrs: _Attrs) -> XfrmPolicy:
    sel, lft, cur, priority, index, direction, action, flags, share = USERPOLICY_INFO.unpack(info)
    return XfrmPolicy(
        sel=decode_selector(sel),
        dir=direction,
        priority=priority,
        index=index,
        action=action,
        flags=flags,
        share=share,
        lifetime=Lifetime(*LIFETIME_CFG.unpack(lft)),
        current=Current(*LIFETIME_CUR.unpack(cur)),
        templates=attrs.templates,
        mark=attrs.mark,
        if_id=attrs.if_id,
        type=attrs.policy_type,
    )


def _decode_body(mtype: int, body: bytes) -> XfrmState | XfrmPolicy | XfrmEvent | None:
    kind = EVENT_KINDS[mtype]
    fixed = {
        "new-sa": USERSA_INFO,
        "update-sa": USERSA_INFO,
        "del-sa": USERSA_ID,
        "expire": USER_EXPIRE,
        "new-policy": USERPOLICY_INFO,
        "update-policy": USERPOLICY_INFO,
        "del-policy": USERPOLICY_ID,
        "polexpire": USER_POLEXPIRE,
        "acquire": USER_ACQUIRE,
        "flush-sa": _USERSA_FLUSH,
        "flush-policy": None,
    }[kind]
    size = fixed.size if fixed else 0
    if len(body) < size:
        _warn(f"XFRM message {kind} too short ({len(body)} < {size} bytes): skipped")
        return None
    head, attrs = body[:size], _Attrs(body[(size + 3) & ~3 :])
    if kind in ("new-sa", "update-sa"):
        return decode_state(head, attrs)
    if kind in ("new-policy", "update-policy"):
        return decode_policy(head, attrs)
    if kind == "expire":
        sa, hard = USER_EXPIRE.unpack(head)
        return XfrmEvent(kind, state=decode_state(sa, attrs), hard=bool(hard))
    if kind == "polexpire":
        pol, hard = USER_POLEXPIRE.unpack(head)
        return XfrmEvent(kind, policy=decode_policy(pol, attrs), hard=bool(hard))
    if kind == "del-sa":  # body is xfrm_usersa_id; the whole SA rides in XFRMA_SA
        return XfrmEvent(kind, state=decode_state(attrs.sa, attrs) if attrs.sa else None)
    if kind == "del-policy":
        return XfrmEvent(kind, policy=decode_policy(attrs.policy, attrs) if attrs.policy else None)
    if kind == "acquire":
        xid, saddr, sel, pol, aalgos, ealgos, calgos, seq = USER_ACQUIRE.unpack(head)
        daddr, spi, proto = XFRM_ID.unpack(xid)
        policy, flow_sel = decode_policy(pol, attrs), decode_selector(sel)
        family = (attrs.templates[0].family if attrs.templates else 0) or flow_sel.family or socket.AF_INET
        return XfrmEvent(
            kind,
            acquire=Acquire(
                _addr(daddr, family),
                _addr(saddr, family),
                _be32(spi),
                proto,
                flow_sel,
                policy,
                aalgos,
                ealgos,
                calgos,
                seq,
                attrs.templates,
            ),
        )
    return XfrmEvent(kind, proto=body[0] if kind == "flush-sa" and body else 0)


def decode_message(raw: bytes) -> XfrmState | XfrmPolicy | XfrmEvent | None:
    """Decode one netlink message (header included) of the XFRM family.

    Dumps and new/update notifications give an :class:`XfrmState` or :class:`XfrmPolicy`;
    other notifications an :class:`XfrmEvent`; anything else, or anything malformed, ``None``
    (with a warning unless it is plain netlink control traffic).
    """
    if len(raw) < NLMSGHDR.size:
        _warn(f"netlink message of {len(raw)} bytes is shorter than its header: skipped")
        return None
    length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(raw)
    if length < NLMSGHDR.size or length > len(raw):
        _warn(f"netlink message length {length} does not fit {len(raw)} bytes: skipped")
        return None
    if mtype < 16:  # NLMSG_NOOP/ERROR/DONE/OVERRUN: the transport's business
        return None
    if mtype not in EVENT_KINDS:
        _warn(f"unknown XFRM message type {mtype}: skipped")
        return None
    try:
        return _decode_body(mtype, raw[NLMSGHDR.size : length])
    except (struct.error, ValueError) as exc:  # defensive: a layout we did not foresee
        _warn(f"undecodable XFRM message type {mtype}: {exc}")
        return None


def split_messages(data: bytes) -> Iterator[bytes]:
    """The netlink messages of one datagram; a malformed tail is skipped with a warning."""
    off = 0
    while off + NLMSGHDR.size <= len(data):
        (length,) = U32.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            _warn(f"malformed netlink message length {length} at offset {off}: rest of datagram skipped")
            return
        yield data[off : off + length]
        off += (length + 3) & ~3


# ---- encoding: per-socket policies (IP_XFRM_POLICY / IPV6_XFRM_POLICY) ----


def _addr_bytes(addr: IPAddress | None) -> bytes:
    return b"" if addr is None else addr.packed


def encode_selector(family: int) -> bytes:
    """A selector that matches everything of ``family`` (a socket policy's own flows)."""
    return SELECTOR.pack(b"", b"", b"", family, 0, 0, 0, 0, 0)


def encode_template(t: Template) -> bytes:
    xid = XFRM_ID.pack(_addr_bytes(t.daddr), t.spi.to_bytes(4, "big"), t.proto)
    return USER_TMPL.pack(
        xid,
        t.family,
        _addr_bytes(t.saddr),
        t.reqid,
        t.mode,
        t.share,
        int(t.optional),
        t.aalgos,
        t.ealgos,
        t.calgos,
    )


def encode_userpolicy_info(family: int, direction: int, priority: int = 0, action: int = 0) -> bytes:
    """``struct xfrm_userpolicy_info`` for a socket policy: match-all selector, no lifetime limits."""
    inf = 0xFFFF_FFFF_FFFF_FFFF
    lft = LIFETIME_CFG.pack(inf, inf, inf, inf, 0, 0, 0, 0)
    return USERPOLICY_INFO.pack(
        encode_selector(family), lft, LIFETIME_CUR.pack(0, 0, 0, 0), priority, 0, direction, action, 0, 0
    )


def encode_socket_policy(family: int, direction: int, templates: Sequence[Template]) -> bytes:
    """The optval of ``setsockopt(IP_XFRM_POLICY)``: userpolicy_info followed by the templates."""
    return encode_userpolicy_info(family, direction) + b"".join(encode_template(t) for t in templates)
