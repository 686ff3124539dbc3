"""Per-socket IPsec policies (``IP_XFRM_POLICY`` / ``IPV6_XFRM_POLICY``) and our record of them.

The kernel cannot be asked which policy a socket carries (getsockopt answers ENOPROTOOPT),
so every policy installed here is remembered, per socket object, until the socket closes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..core.selectors import IPAddress
from . import _wire as wire
from ._records import IPPROTO_AH, IPPROTO_COMP, IPPROTO_ESP, Template

IP_XFRM_POLICY = 17
IPV6_XFRM_POLICY = 35
DIRS = {"in": 0, "out": 1}
PROTOS = {"esp": IPPROTO_ESP, "ah": IPPROTO_AH, "comp": IPPROTO_COMP, "ipcomp": IPPROTO_COMP}
MODES = {"transport": 0, "tunnel": 1, "beet": 4}


@dataclass(frozen=True)
class SocketPolicy:
    """What :func:`set_socket_policy` installed on a socket (the kernel cannot be asked back).

    ``index`` is the kernel's SPD index of the policy when it could be learnt (the socket
    policies of the socket's namespace, dumped before and after), else None.
    """

    direction: str
    templates: tuple[Template, ...]
    index: int | None = None


_records: weakref.WeakKeyDictionary[socket.socket, dict[str, SocketPolicy]] = weakref.WeakKeyDictionary()
#: The same record by socket identity (st_dev, st_ino), whatever descriptor or object it was set through:
#: (the socket's netns id, direction -> policy). Entries of closed sockets are dropped by :func:`prune`.
_by_key: dict[tuple[int, int], tuple[tuple[int, int] | None, dict[str, SocketPolicy]]] = {}
_records_lock = threading.Lock()
SIOCGSKNS = 0x894C


def identity(sock: socket.socket) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(socket identity, netns identity) of ``sock``; the netns is None when SIOCGSKNS fails."""
    st = os.fstat(sock.fileno())
    try:
        ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    except OSError:
        return (st.st_dev, st.st_ino), None
    try:
        ns = os.fstat(ns_fd)
    finally:
        os.close(ns_fd)
    return (st.st_dev, st.st_ino), (ns.st_dev, ns.st_ino)


def record(sock: socket.socket, policy: SocketPolicy) -> None:
    """Remember ``policy`` as in force on ``sock`` (by object and by identity)."""
    with _records_lock:
        _records.setdefault(sock, {})[policy.direction] = policy
        key, ns = identity(sock)
        entry = _by_key.setdefault(key, (ns, {}))
        entry[1][policy.direction] = policy


def recorded(key: tuple[int, int]) -> dict[str, SocketPolicy]:
    """The policies this process installed on the socket with identity ``key`` (any descriptor of it)."""
    with _records_lock:
        entry = _by_key.get(key)
        return dict(entry[1]) if entry else {}


def recorded_indexes(netns_id: tuple[int, int] | None) -> set[int]:
    """SPD indexes of every socket policy this process installed in namespace ``netns_id``."""
    with _records_lock:
        return {
            p.index for ns, pols in _by_key.values() if ns == netns_id for p in pols.values() if p.index is not None
        }


def prune(netns_id: tuple[int, int] | None, present: set[int]) -> None:
    """Forget the records of ``netns_id`` whose policies are no longer in its SPD (their sockets closed)."""
    with _records_lock:
        for key, (ns, pols) in list(_by_key.items()):
            if ns == netns_id and pols and all(p.index is not None and p.index not in present for p in pols.values()):
                del _by_key[key]


def socket_template(
    proto: str | int = "esp",
    mode: str = "transport",
    *,
    family: int = 0,
    daddr: IPAddress | None = None,
    saddr: IPAddress | None = None,
    reqid: int = 0,
    level: str = "required",
    spi: int = 0,
) -> Template:
    """A :class:`Template` for :func:`set_socket_policy`: ESP/AH/IPComp, transport or tunnel mode.

    Tunnel mode needs ``daddr`` and ``saddr`` (the tunnel end points). ``level`` "use"
    makes the template optional (protect if an SA exists, else send in clear).
    """
    if level not in ("required", "use"):
        raise ValueError(f"level must be 'required' or 'use', not {level!r}")
    proto_num = PROTOS[proto] if isinstance(proto, str) else proto
    if proto_num not in (IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP):
        raise ValueError(f"unsupported protocol {proto!r}")
    if mode != "transport" and (daddr is None or saddr is None):
        raise ValueError(f"{mode} mode needs daddr and saddr")
    if daddr is not None and family == 0:
        family = socket.AF_INET if daddr.version == 4 else socket.AF_INET6
    zero: IPAddress = ipaddress.IPv6Address(0) if family == socket.AF_INET6 else ipaddress.IPv4Address(0)
    return Template(
        family=family,
        daddr=daddr or zero,
        saddr=saddr or zero,
        spi=spi,
        proto=proto_num,
        mode=MODES[mode],
        reqid=reqid,
        optional=level == "use",
    )


def _sockopt(sock: socket.socket) -> tuple[int, int]:
    if sock.family == socket.AF_INET:
        return socket.IPPROTO_IP, IP_XFRM_POLICY
    if sock.family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    raise ValueError(f"per-socket IPsec policies need an AF_INET/AF_INET6 socket, not {sock.family!r}")


def _install(sock: socket.socket, policy: SocketPolicy) -> None:
    level, opt = _sockopt(sock)
    templates = tuple(t if t.family else replace(t, family=sock.family) for t in policy.templates)
    sock.setsockopt(level, opt, wire.encode_socket_policy(sock.family, DIRS[policy.direction], templates))


def set_socket_policy(
    sock: socket.socket,
    direction: str,
    templates: Sequence[Template | str],
    level: str = "required",
    reqid: int = 0,
) -> SocketPolicy:
    """Install a per-socket IPsec policy (``IP_XFRM_POLICY``/``IPV6_XFRM_POLICY``) for ``direction``.

    ``templates`` are :class:`Template` (see :func:`socket_template`) or protocol names
    ("esp", "ah", "comp"), which become transport-mode templates with ``level`` and ``reqid``.
    An empty ``templates`` installs a bypass policy (this socket skips the global SPD).
    With a required template and no SA the kernel asks the key manager (acquire) and
    the socket fails closed (EAGAIN) until the SA exists. Raises OSError from setsockopt.
    """
    if direction not in DIRS:
        raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
    tmpls = tuple(socket_template(t, level=level, reqid=reqid) if isinstance(t, str) else t for t in templates)
    policy = SocketPolicy(direction, tmpls)
    with _records_lock:
        _install(sock, policy)
    record(sock, policy)
    return policy


def clear_socket_policy(sock: socket.socket, direction: str | None = None) -> None:
    """Remove the socket's policy for ``direction`` ("in"/"out"), or both when None.

    The kernel can only drop both directions at once, so the other one is reinstalled
    from our record.
    """
    level, opt = _sockopt(sock)
    with _records_lock:
        mine = _records.get(sock, {})
        sock.setsockopt(level, opt, None, 0)  # NULL optval: the kernel drops both directions
        keep = {d: replace(p, index=None) for d, p in mine.items() if direction is not None and d != direction}
        for p in keep.values():
            _install(sock, p)  # a new kernel policy: its index is no longer known
        if keep:
            _records[sock] = keep
        else:
            _records.pop(sock, None)
        key, ns = identity(sock)
        if keep:
            _by_key[key] = (ns, dict(keep))
        else:
            _by_key.pop(key, None)


def socket_policies(sock: socket.socket) -> dict[str, SocketPolicy]:
    """The per-socket policies this process installed on ``sock`` and that are still in force."""
    if sock.fileno() == -1:
        return {}
    with _records_lock:
        return dict(_records.get(sock, {}))
