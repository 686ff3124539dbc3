"""Data-plane guards: after ipsec_set_socket_pToken nothing leaves a socket unprotected, ever.

* ``kernel-libipsec``: the socket is bound to the TUN device (SO_BINDTODEVICE
  ``ipsec0``). Everything it sends enters charon's userspace ESP, which drops
  packets no installed SA covers; it only receives what arrived decrypted
  through ``ipsec0``. With no route via ``ipsec0`` Linux still sends a bound
  socket's packets to that device ("assume on link"), so there is no path
  around it.
* ``kernel-xfrm``: per-socket policies (IP_XFRM_POLICY / IPV6_XFRM_POLICY) in
  both directions requiring ESP: without an SA the kernel refuses to send
  (EAGAIN on connect) instead of sending in clear. That is the guard of a socket
  whose SA is known (an operator's, re-armed with its reqid) and of backends
  without a responder; ``set_socket_pToken`` on strongSwan arms a *trap* instead
  (:mod:`btns_vici.acquire`: the socket's mark, an SPD out policy on it, and the in
  policy), so that a plain ``connect(2)`` waits for an SA negotiated on the
  kernel's ACQUIRE rather than failing.

``optional=True`` ("use IPsec if the peer can, else clear", policyName ``btns:use``): on
kernel XFRM the socket policies' templates are ``level use`` (the kernel uses an SA when
one exists, else sends clear; what strongSwan arms with ``options["acquire"] = "no"``, its
default being an optional *trap*: :mod:`btns_vici.acquire`); on kernel-libipsec the socket
is left unbound (routing sends it into ``ipsec0`` exactly when an SA covers it).
"""

from __future__ import annotations

import errno
import socket

from .core.errors import BtnsError, NotSupportedError
from .core.records import LIBIPSEC as LIBIPSEC  # the data planes a guard exists for
from .core.records import LIBIPSEC_DEVICE as LIBIPSEC_DEVICE
from .core.records import XFRM as XFRM
from .sockets import FileDescriptorLike, borrowed_socket, check_inet


def bound_device(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 64)
    return raw.split(b"\0", 1)[0].decode()


def apply(fd: FileDescriptorLike, dataplane: str, reqid: int = 0, optional: bool = False) -> str:
    """Arm the guard of ``dataplane`` on ``fd``; returns a description for Enforcement."""
    with borrowed_socket(fd) as sock:
        check_inet(sock)
        if optional and dataplane == LIBIPSEC:
            return "none (opportunistic: routed into ipsec0 only while an SA covers the flow)"
        if optional and dataplane == XFRM:
            from . import xfrm

            for direction in ("out", "in"):
                xfrm.set_socket_policy(sock, direction, ["esp"], level="use", reqid=reqid)
            return "per-socket XFRM policy in/out, ESP level use (opportunistic)"
        if dataplane == LIBIPSEC:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, LIBIPSEC_DEVICE.encode())
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    raise BtnsError(
                        f"no {LIBIPSEC_DEVICE} device in this socket's network namespace: is charon "
                        "with kernel-libipsec running there?",
                        errno.ENODEV,
                    ) from None
                raise
            return f"SO_BINDTODEVICE {LIBIPSEC_DEVICE}"
        if dataplane == XFRM:
            from . import xfrm

            for direction in ("out", "in"):
                xfrm.set_socket_policy(sock, direction, ["esp"], level="required", reqid=reqid)
            return "per-socket XFRM policy in/out, ESP required"
    raise NotSupportedError(f"no data-plane guard for {dataplane!r}")
