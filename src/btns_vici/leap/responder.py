"""The responder of the leap-of-faith key exchange: a UDP listener facing the network (hostile input).

Rules (README "Leap of faith"): fixed-size datagrams only (anything else is dropped without
answer); no state before return routability: a HELLO is answered by a stateless cookie
(HMAC of the source address, port and nonce under a secret that rotates every
:data:`COOKIE_LIFETIME` seconds), 40 bytes for a 128-byte question (no amplification);
only a KEYREQ carrying a valid cookie reaches the signature check, the store and charon;
token buckets per source address (HELLO and KEYREQ separately, a bounded table) and global
ones bound the work; every answer is at most the size of its question.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .. import knownpeers, netns
from ..core.errors import NotSupportedError
from ..hostkey import load_or_create
from . import DEFAULT_PORT, wire
from .charon import load_peer_conn, operator_conn_for

if TYPE_CHECKING:
    from ..strongswan.plugin import Context

log = logging.getLogger("btns_vici.leap")

COOKIE_LIFETIME = 30.0
MAX_SOURCES = 4096


@dataclass
class Limits:
    hello_rate: float = 20.0  # per source address, per second
    hello_burst: float = 40.0
    keyreq_rate: float = 10.0
    keyreq_burst: float = 20.0
    global_hello_rate: float = 5000.0
    global_keyreq_rate: float = 200.0
    max_peer_conns: int = 1024


@dataclass
class Stats:
    received: int = 0
    malformed: int = 0
    rate_limited: int = 0
    cookies: int = 0
    bad_cookie: int = 0
    bad_signature: int = 0
    learned: int = 0
    changed: int = 0
    refused: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    by_type: dict[int, int] = field(default_factory=dict)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.stamp = burst, now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


IP_PKTINFO = 8  # <linux/in.h>; Python 3.11's socket module lacks it
_CMSG_SPACE = socket.CMSG_SPACE(20)  # in6_pktinfo (20) >= in_pktinfo (12)


def _pktinfo(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, tuple[int, int, bytes]] | None:
    """(the datagram's destination address, the cmsg that sends an answer from it) from recvmsg's ancdata."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return plain_addr(socket.inet_ntop(socket.AF_INET6, data[:16])), (level, kind, data[:16] + bytes(4))
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            dst = data[8:12]  # ipi_addr: the header's destination; answer with ipi_spec_dst = it, any ifindex
            return socket.inet_ntop(socket.AF_INET, dst), (level, kind, bytes(4) + dst + bytes(4))
    return None


def plain_addr(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Responder:
    """Answers the exchange on ``bind`` (default ``[::]:5386``, dual stack) for one charon.

    ``options`` are the strongSwan backend's (``vici_socket``, ``netns``, ``key_dir``); the
    socket is opened in ``netns`` and the serving thread lives there. ``charon=False`` learns
    keys without loading connections (tests of the protocol alone).
    """

    def __init__(
        self,
        options: Mapping[str, str],
        host: str = "::",
        port: int = DEFAULT_PORT,
        limits: Limits | None = None,
        charon: bool = True,
    ) -> None:
        self.options = dict(options)
        self.limits = limits or Limits()
        self.host = load_or_create(self.options.get("key_dir"))
        key = serialization.load_pem_private_key(self.host.private_pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("the host key is not Ed25519")
        self._priv = key
        self._raw = wire.raw_of(self.host.public_der)
        self.store = knownpeers.register(self.options.get("key_dir"))
        self.stats = Stats()
        self._secrets = [os.urandom(32), os.urandom(32)]
        self._rotated = time.monotonic()
        self._sources: collections.OrderedDict[str, tuple[_Bucket, _Bucket]] = collections.OrderedDict()
        now = time.monotonic()
        self._g_hello = _Bucket(self.limits.global_hello_rate, now)
        self._g_keyreq = _Bucket(self.limits.global_keyreq_rate, now)
        self._charon = charon
        self._ctx: Context | None = None
        self._loaded: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with netns.entered(self.options.get("netns")):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # next to our own initiators
            try:
                if family == socket.AF_INET6 and host == "::":
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                # Every answer leaves from the address its question was sent to (a host with several
                # addresses on a link, e.g. IPv6, would otherwise answer from another one, which the
                # initiator's connected socket ignores); also the local end of the peer's connection.
                if family == socket.AF_INET6:
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                self.sock.bind((host, port))
            except OSError:
                self.sock.close()
                raise
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    # -- charon ----------------------------------------------------------------------------
    def _context(self) -> Context:
        if self._ctx is None:
            from ..plugins import get_plugin_manager

            plugin = get_plugin_manager().get_plugin("strongswan")
            if plugin is None:  # built in (plugins.BUILTIN_BACKENDS): only a broken install lacks it
                raise NotSupportedError("the strongswan backend plugin is not registered")
            self._ctx = plugin.context(self.options)
        return self._ctx

    def _local_for(self, peer: str) -> str:
        fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:  # the serving thread is in the namespace
            s.connect((peer, 9))
            return str(s.getsockname()[0])

    # -- the protocol ----------------------------------------------------------------------
    def _cookie_ok(self, addr: str, port: int, msg: wire.Message) -> bool:
        return any(hmac.compare_digest(wire.make_cookie(s, addr, port, msg.nonce), msg.cookie) for s in self._secrets)

    def _rotate(self, now: float) -> None:
        if now - self._rotated >= COOKIE_LIFETIME:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._rotated = now

    def _buckets(self, addr: str, now: float) -> tuple[_Bucket, _Bucket]:
        b = self._sources.get(addr)
        if b is None:
            if len(self._sources) >= MAX_SOURCES:
                self._sources.popitem(last=False)
            b = self._sources[addr] = (_Bucket(self.limits.hello_burst, now), _Bucket(self.limits.keyreq_burst, now))
        else:
            self._sources.move_to_end(addr)
        return b

    def handle(self, data: bytes, addr: str, port: int, local: str | None = None) -> bytes | None:
        """One datagram from (addr, port) to ``local`` -> the answer to send back (None: drop silently)."""
        st = self.stats
        st.received += 1
        st.bytes_in += len(data)
        try:
            msg = wire.parse(data)
        except wire.WireError:
            st.malformed += 1
            return None
        st.by_type[msg.type] = st.by_type.get(msg.type, 0) + 1
        now = time.monotonic()
        self._rotate(now)
        addr = plain_addr(addr)
        hello_b, keyreq_b = self._buckets(addr, now)
        if msg.type == wire.HELLO:
            lim = self.limits
            if not (
                hello_b.take(lim.hello_rate, lim.hello_burst, now)
                and self._g_hello.take(lim.global_hello_rate, lim.global_hello_rate, now)
            ):
                st.rate_limited += 1
                return None
            st.cookies += 1
            return wire.cookie_msg(msg.nonce, wire.make_cookie(self._secrets[0], addr, port, msg.nonce))
        if msg.type != wire.KEYREQ:
            st.malformed += 1  # answers are never accepted by a responder
            return None
        if not self._cookie_ok(addr, port, msg):
            st.bad_cookie += 1
            return None
        lim = self.limits
        if not (
            keyreq_b.take(lim.keyreq_rate, lim.keyreq_burst, now)
            and self._g_keyreq.take(lim.global_keyreq_rate, lim.global_keyreq_rate, now)
        ):
            st.rate_limited += 1
            return None
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(msg.key).verify(
                msg.sig, wire.keyreq_transcript(msg.nonce, msg.cookie, msg.key)
            )
        except (InvalidSignature, ValueError):
            st.bad_signature += 1
            return None
        if msg.key == self._raw:
            st.refused += 1
            return wire.refused(msg.nonce, wire.R_POLICY)  # our own key: a reflection
        # Return routability proven and the key possessed: now (and only now) state.
        try:
            reason = self._accept(addr, wire.spki_of(msg.key), local)
        except Exception as exc:  # charon down, store unwritable: refuse, never crash the listener
            st.errors += 1
            log.warning("leap of faith: %s: %s", addr, exc)
            reason = wire.R_BUSY
        if reason:
            st.refused += 1
            return wire.refused(msg.nonce, reason)
        sig = self._priv.sign(wire.key_transcript(msg.nonce, msg.cookie, msg.key, self._raw))
        return wire.key_msg(msg.nonce, self._raw, sig)

    def _accept(self, addr: str, spki: bytes, local: str | None = None) -> int:
        if self._charon:
            found = operator_conn_for(self._context().session, addr)
            if found is not None:
                log.warning("leap of faith: refused %s: the operator's connection %r (%s) covers it", addr, *found)
                return wire.R_CONFIGURED
        entry = self.store.get(addr)
        if entry is not None and entry.pinned and entry.spki != spki:
            self.store.learn(addr, spki, knownpeers.LEARNED_RESPONDER)
            self.stats.changed += 1
            return wire.R_PINNED
        outcome, _ = self.store.learn(addr, spki, knownpeers.LEARNED_RESPONDER)
        if outcome == knownpeers.CHANGED:
            self.stats.changed += 1
        elif outcome == knownpeers.NEW:
            self.stats.learned += 1
        if self._charon:
            ctx = self._context()
            load_peer_conn(ctx.session, ctx.dataplane(), self.host, local or self._local_for(addr), addr, spki)
            self._loaded[addr] = addr
            self._loaded.move_to_end(addr)
            while len(self._loaded) > self.limits.max_peer_conns:
                old, _ = self._loaded.popitem(last=False)
                from .charon import unload_peer_conn

                try:
                    unload_peer_conn(ctx.session, old)
                except OSError as exc:
                    log.info("leap of faith: unloading the connection of %s: %s", old, exc)
        return 0

    # -- serving ---------------------------------------------------------------------------
    def serve_forever(self) -> None:
        with netns.entered(self.options.get("netns")):
            while not self._stop.is_set():
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                if not ready:
                    continue
                for _ in range(256):
                    try:
                        data, anc, _flags, peer = self.sock.recvmsg(wire.MAX_DATAGRAM + 1, _CMSG_SPACE)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # e.g. an ICMP error queued on the socket
                        log.debug("leap of faith: recvmsg: %s", exc)
                        continue
                    info = _pktinfo(anc)
                    answer = self.handle(data, peer[0], peer[1], info[0] if info else None)
                    if answer is not None:
                        try:
                            self.sock.sendmsg([answer], [info[1]] if info else [], 0, peer)
                            self.stats.bytes_out += len(answer)
                        except OSError as exc:
                            log.debug("leap of faith: sendto %s: %s", peer[0], exc)

    def start(self) -> Responder:
        self._thread = threading.Thread(target=self.serve_forever, name="btns-leap", daemon=True)
        self._thread.start()
        log.info("leap of faith: listening on udp/%d (netns %s)", self.port, self.options.get("netns") or "own")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> Responder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
