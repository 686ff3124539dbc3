"""The initiator of the leap-of-faith key exchange: ask a peer for its host key, tell it ours."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .. import netns
from ..core.errors import BtnsError
from ..hostkey import HostIdentity
from . import wire

#: Total time one exchange may take, and how often a datagram is retransmitted within it.
TIMEOUT = 3.0
RETRANSMIT = 0.25


def _wait(sock: socket.socket, nonce: bytes, want: tuple[int, ...], deadline: float, resend: bytes) -> wire.Message:
    next_send = time.monotonic() + RETRANSMIT
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise BtnsError("no answer", errno.ETIMEDOUT)
        ready, _, _ = select.select([sock], [], [], min(deadline, next_send) - now)
        if not ready:
            if time.monotonic() >= next_send:
                sock.send(resend)
                next_send = time.monotonic() + RETRANSMIT
            continue
        try:
            data = sock.recv(wire.MAX_DATAGRAM + 1)
        except ConnectionRefusedError:  # ICMP port unreachable: nobody listens
            raise BtnsError("port unreachable", errno.ECONNREFUSED) from None
        except OSError:
            continue
        try:
            msg = wire.parse(data)
        except wire.WireError:
            continue
        if msg.nonce == nonce and msg.type in want:
            return msg


_locks: dict[tuple[str | None, str, int], threading.Lock] = {}
_locks_guard = threading.Lock()


def exchange(
    peer: str,
    port: int,
    host: HostIdentity,
    netns_name: str | None = None,
    timeout: float = TIMEOUT,
    bind_port: bool = True,
    source: str | None = None,
) -> bytes:
    """:func:`exchange_once`, one at a time per (namespace, peer, port) in this process (they share
    the 4-tuple when bound to the learner's port)."""
    with _locks_guard:
        lock = _locks.setdefault((netns_name, peer, port), threading.Lock())
    with lock:
        return exchange_once(peer, port, host, netns_name, timeout, bind_port, source)


def exchange_once(
    peer: str,
    port: int,
    host: HostIdentity,
    netns_name: str | None = None,
    timeout: float = TIMEOUT,
    bind_port: bool = True,
    source: str | None = None,
) -> bytes:
    """Run HELLO/COOKIE/KEYREQ/KEY with ``peer``; its host key (DER SPKI), proven possessed.

    ``source``: the local address to send from (the IKE_SA's; default: the kernel's choice).

    The socket is bound to ``port`` too (SO_REUSEADDR: next to this host's own learner; a
    connected socket wins the replies) and connected (only datagrams from ``peer``:``port`` are read). Errors:
    ETIMEDOUT (no answer), ECONNREFUSED (nobody listens), EACCES (REFUSED, with the reason),
    EPROTO (a KEY whose signature does not verify).
    """
    priv = serialization.load_pem_private_key(host.private_pem, password=None)
    if not isinstance(priv, ed25519.Ed25519PrivateKey):
        raise BtnsError("the host key is not Ed25519", errno.EINVAL)
    raw_i = wire.raw_of(host.public_der)
    fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with netns.entered(netns_name):
        sock = socket.socket(fam, socket.SOCK_DGRAM)
    with sock:
        # From the learner's own port, like IKE's 500 -> 500: an inbound filter then lets in only
        # udp/5386 (README "Leap of faith"), never clear datagrams from a port an attacker chooses.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        any_addr = source or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
        try:
            sock.bind((any_addr, port if bind_port else 0))
        except OSError:
            sock.bind((any_addr, 0))
        sock.connect((peer, port))
        deadline = time.monotonic() + timeout
        nonce = os.urandom(wire.NONCE_LEN)
        hello = wire.hello(nonce)
        sock.send(hello)
        got = _wait(sock, nonce, (wire.COOKIE,), deadline, hello)
        sig = priv.sign(wire.keyreq_transcript(nonce, got.cookie, raw_i))
        req = wire.keyreq(nonce, got.cookie, raw_i, sig)
        sock.send(req)
        ans = _wait(sock, nonce, (wire.KEY, wire.REFUSED), deadline, req)
        if ans.type == wire.REFUSED:
            why = wire.REASONS.get(ans.reason, f"reason {ans.reason}")
            raise BtnsError(f"{peer} refused the leap-of-faith exchange: {why}", errno.EACCES)
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(ans.key).verify(
                ans.sig, wire.key_transcript(nonce, got.cookie, raw_i, ans.key)
            )
        except (InvalidSignature, ValueError):
            raise BtnsError(f"{peer} sent a key it does not prove to hold", errno.EPROTO) from None
        if ans.key == raw_i:
            raise BtnsError(f"{peer} answered with our own key (a reflection)", errno.EPROTO)
        return wire.spki_of(ans.key)
