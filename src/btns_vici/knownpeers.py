"""The known-peers store: the ssh ``known_hosts`` of IPsec (README "Leap of faith").

One entry per peer address: the raw public key first learned from it (DER SPKI), its IKE
identity (the key id strongSwan uses for a bare key), when it was learned and how
(``leap-initiator``: we asked it; ``leap-responder``: it told us; ``pin``: an operator put it
there), when it was last seen, whether an operator pinned it, the IKE_SAs that were the first
contact, and every *other* key seen from that address since (never replacing the stored one:
as with ssh, a changed key stays refused until an operator runs ``btns peers forget`` or
``btns peers pin``).

It lives in the host-key directory (``$BTNS_KEY_DIR``, default ``/var/lib/btns-vici``) as
``known_peers.json`` (mode 0600; written whole to a temporary file and renamed, under an
``flock`` on ``known_peers.lock``). At most :data:`MAX_PEERS` entries: the least recently
seen unpinned one makes room.

Reporting (:func:`method_for`, used by :mod:`btns_vici.core.derive` for raw-key peers): an SA whose
peer key equals the stored one is ``LEAPOFFAITH`` unless it is the first contact (the first
IKE_SA after the key was learned: ``BTNS``); a key other than the stored one is ``BTNS`` and
logged as a changed key; an address the store does not know is ``BTNS``.

Peers that authenticated with NULL (RFC 7619, libreswan) have no key: they get a
:class:`NullPeer` record of their own (section ``null_peers``; :meth:`KnownPeers.note_null`):
the IKE identity the daemon reported for them (self-asserted; libreswan may substitute the
conn's or the address), the IKE_SAs ("sessions") seen, and every other identity reported for
that address since. It can tell "the same IKE_SA" and "another IKE_SA, so perhaps another
peer" apart, never "the same peer" (README "Leap of faith", libreswan).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .core.constants import AuthMethod
from .core.errors import BtnsError

if TYPE_CHECKING:
    from .core.records import IkeSA

_T = TypeVar("_T")

log = logging.getLogger("btns_vici.knownpeers")

FILE_NAME = "known_peers.json"
LOCK_NAME = "known_peers.lock"
MAX_PEERS = 4096
MAX_CHANGES = 8  # other keys remembered per entry
MAX_FIRST_SAS = 4
LEARNED_INITIATOR, LEARNED_RESPONDER, LEARNED_PIN = "leap-initiator", "leap-responder", "pin"
NEW, SAME, CHANGED = "new", "same", "changed"
LEARNED_NULL = "null-auth"
#: :meth:`KnownPeers.note_null` verdicts: never seen; an IKE_SA seen before (the same session
#: peer: the SA's keys bind it); another IKE_SA with the identity first claimed (maybe another
#: peer: NULL auth cannot tell); another identity than the one first claimed.
FIRST_CONTACT, SAME_SESSION, NEW_SESSION, OTHER_IDENTITY = (
    "first-contact",
    "same-session",
    "new-session",
    "other-identity",
)
MAX_SESSIONS = 16  # IKE_SAs remembered per NULL peer
NULL_SEEN_EVERY = 60.0  # seconds: last_seen of an unchanged NULL session is written at most this often


def keyid(spki: bytes) -> str:
    """strongSwan's identity of a bare key: SHA-1 of its DER SPKI, colon hex."""
    return ":".join(f"{b:02x}" for b in hashlib.sha1(spki).digest())


def fingerprint(spki: bytes) -> str:
    """``SHA256:<base64>`` of the DER SPKI (ssh's fingerprint style)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode().rstrip("=")


def normalize(addr: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(addr)))
    except ValueError:
        raise BtnsError(f"{addr!r} is not an IP address", errno.EINVAL) from None


@dataclass
class Change:
    key: str  # base64 DER SPKI
    first_seen: float
    last_seen: float
    count: int = 1
    how: str = ""


@dataclass
class Entry:
    address: str
    key: str  # base64 DER SPKI
    ike_id: str
    first_seen: float
    last_seen: float
    how: str
    pinned: bool = False
    contacts: int = 0
    first_sas: list[str] = field(default_factory=list)
    first_open: bool = True  # the first contact's IKE_SA is not recorded yet
    changes: list[Change] = field(default_factory=list)

    @property
    def spki(self) -> bytes:
        return base64.b64decode(self.key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.spki)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["changes"] = [
            Change(**{k: v for k, v in c.items() if k in Change.__dataclass_fields__}) for c in d.get("changes", [])
        ]
        return cls(**d)


@dataclass
class ClaimedId:
    ike_id: str
    first_seen: float
    last_seen: float
    count: int = 1


@dataclass
class NullPeer:
    """A NULL-authenticated peer address: what it claimed, and the IKE_SAs seen (no key)."""

    address: str
    ike_id: str  # the identity first reported (self-asserted: anyone may claim it)
    first_seen: float
    last_seen: float
    session: str  # the newest IKE_SA seen
    sessions: int = 1  # distinct IKE_SAs seen
    recent: list[str] = field(default_factory=list)  # the last MAX_SESSIONS IKE_SAs
    other_ids: list[ClaimedId] = field(default_factory=list)
    how: str = LEARNED_NULL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NullPeer:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["other_ids"] = [
            ClaimedId(**{k: v for k, v in c.items() if k in ClaimedId.__dataclass_fields__})
            for c in d.get("other_ids", [])
        ]
        return cls(**d)


def _b64(spki: bytes) -> str:
    return base64.b64encode(spki).decode()


class KnownPeers:
    """The store in ``directory`` (default: the host-key directory)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        from .hostkey import key_dir

        self.dir = key_dir(directory)
        self.path = self.dir / FILE_NAME
        self._cache: tuple[tuple[int, int, int], dict[str, Entry], dict[str, NullPeer]] | None = None
        self._mutex = threading.Lock()

    # -- file ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._mutex:
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _load(self) -> tuple[dict[str, Entry], dict[str, NullPeer]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}, {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1], self._cache[2]
        try:
            raw = json.loads(self.path.read_bytes())
            peers = {a: Entry.from_json(e) for a, e in raw.get("peers", {}).items()}
            nulls = {a: NullPeer.from_json(e) for a, e in raw.get("null_peers", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BtnsError(f"{self.path}: not a known-peers store ({exc})", errno.EINVAL) from None
        self._cache = (stamp, peers, nulls)
        return peers, nulls

    def _read(self) -> dict[str, Entry]:
        return self._load()[0]

    def _write(self, peers: dict[str, Entry], nulls: dict[str, NullPeer] | None = None) -> None:
        if nulls is None:
            nulls = {a: NullPeer.from_json(e.to_json()) for a, e in self._load()[1].items()}
        if len(peers) > MAX_PEERS:
            spare = sorted((e for e in peers.values() if not e.pinned), key=lambda e: e.last_seen)
            for e in spare[: len(peers) - MAX_PEERS]:
                del peers[e.address]
        if len(nulls) > MAX_PEERS:
            for n in sorted(nulls.values(), key=lambda n: n.last_seen)[: len(nulls) - MAX_PEERS]:
                del nulls[n.address]
        doc: dict[str, Any] = {"version": 1, "peers": {a: e.to_json() for a, e in sorted(peers.items())}}
        if nulls:
            doc["null_peers"] = {a: n.to_json() for a, n in sorted(nulls.items())}
        data = json.dumps(doc, indent=1).encode()
        tmp = self.dir / f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._cache = None

    def _update(self, fn: Callable[[dict[str, Entry]], _T]) -> _T:
        with self._locked():
            self._cache = None
            peers = {a: Entry.from_json(e.to_json()) for a, e in self._read().items()}
            result = fn(peers)
            self._write(peers)
            return result

    def _update_null(self, fn: Callable[[dict[str, NullPeer]], _T]) -> _T:
        with self._locked():
            self._cache = None
            loaded, nulls = self._load()
            peers = {a: Entry.from_json(e.to_json()) for a, e in loaded.items()}
            nulls = {a: NullPeer.from_json(n.to_json()) for a, n in nulls.items()}
            result = fn(nulls)
            self._write(peers, nulls)
            return result

    # -- queries ---------------------------------------------------------------------------
    def get(self, addr: Any) -> Entry | None:
        return self._read().get(normalize(addr))

    def entries(self) -> list[Entry]:
        return sorted(self._read().values(), key=lambda e: ipaddress.ip_address(e.address).packed)

    def get_null(self, addr: Any) -> NullPeer | None:
        return self._load()[1].get(normalize(addr))

    def null_peers(self) -> list[NullPeer]:
        return sorted(self._load()[1].values(), key=lambda n: ipaddress.ip_address(n.address).packed)

    # -- changes ---------------------------------------------------------------------------
    def learn(self, addr: Any, spki: bytes, how: str) -> tuple[str, Entry]:
        """Record ``spki`` seen from ``addr``: NEW (stored), SAME, or CHANGED (kept aside, logged)."""
        a, now = normalize(addr), time.time()

        def fn(peers: dict[str, Entry]) -> tuple[str, Entry]:
            e = peers.get(a)
            if e is None:
                e = peers[a] = Entry(a, _b64(spki), keyid(spki), now, now, how)
                log.info("learned the key of peer %s (%s, %s): first contact, unauthenticated", a, e.fingerprint, how)
                return NEW, e
            if e.spki == spki:
                e.last_seen = now
                return SAME, e
            k = _b64(spki)
            ch = next((c for c in e.changes if c.key == k), None)
            if ch is None:
                e.changes.append(Change(k, now, now, 1, how))
                del e.changes[:-MAX_CHANGES]
            else:
                ch.last_seen, ch.count = now, ch.count + 1
            log.warning(
                "KEY CHANGED for peer %s: it now presents %s, the stored key is %s (learned %s by %s%s); "
                "a different peer, or a man in the middle now or at first contact",
                a,
                fingerprint(spki),
                e.fingerprint,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.first_seen)),
                e.how,
                ", pinned" if e.pinned else "",
            )
            return CHANGED, e

        return self._update(fn)

    def forget(self, addr: Any) -> bool:
        a = normalize(addr)
        keyed = self._update(lambda peers: peers.pop(a, None) is not None)
        null = self.get_null(a) is not None and self._update_null(lambda nulls: nulls.pop(a, None) is not None)
        return keyed or null

    def pin(self, addr: Any, spki: bytes | None = None) -> Entry:
        """Pin ``addr`` to ``spki`` (default: its stored key); a key change is then always refused."""
        a, now = normalize(addr), time.time()

        def fn(peers: dict[str, Entry]) -> Entry:
            e = peers.get(a)
            if spki is None:
                if e is None:
                    raise BtnsError(f"no known peer {a}: give its key to pin it", errno.ENOENT)
            elif e is None or e.spki != spki:
                e = peers[a] = Entry(a, _b64(spki), keyid(spki), now, now, LEARNED_PIN, first_open=False)
            e.pinned, e.first_open = True, False
            e.changes = [c for c in e.changes if c.key != e.key]
            return e

        return self._update(fn)

    def note_sa(self, addr: Any, spki: bytes, sa_id: str) -> tuple[AuthMethod, Entry | None]:
        """The method an IKE_SA ``sa_id`` with peer key ``spki`` from ``addr`` is reported with."""
        a = normalize(addr)
        e = self._read().get(a)
        if e is None:
            return AuthMethod.BTNS, None
        if e.spki != spki:
            self.learn(a, spki, "ike")
            return AuthMethod.BTNS, e
        if sa_id in e.first_sas:
            return AuthMethod.BTNS, e
        if e.first_open:

            def fn(peers: dict[str, Entry]) -> AuthMethod:
                cur = peers.get(a)
                if cur is None or cur.spki != spki:
                    return AuthMethod.BTNS
                if sa_id in cur.first_sas:
                    return AuthMethod.BTNS
                if cur.first_open:
                    cur.first_sas = [*cur.first_sas, sa_id][-MAX_FIRST_SAS:]
                    cur.first_open, cur.contacts = False, cur.contacts + 1
                    return AuthMethod.BTNS
                cur.contacts += 1
                return AuthMethod.LEAPOFFAITH

            return self._update(fn), e
        return AuthMethod.LEAPOFFAITH, e

    def note_null(self, addr: Any, ike_id: str, session: str) -> tuple[str, NullPeer]:
        """A NULL-authenticated IKE_SA ``session`` from ``addr`` claiming ``ike_id``: the verdict
        (:data:`FIRST_CONTACT`, :data:`SAME_SESSION`, :data:`NEW_SESSION`, :data:`OTHER_IDENTITY`)
        and the record. There is no key: the record can say that this is another IKE_SA (perhaps
        another peer) or another claimed identity, never that it is the same peer.
        """
        a, now = normalize(addr), time.time()
        cur = self._load()[1].get(a)
        if cur is not None and session in cur.recent and now - cur.last_seen < NULL_SEEN_EVERY:
            # nothing new: no write (this runs on every pToken query)
            return (SAME_SESSION if ike_id == cur.ike_id else OTHER_IDENTITY), cur

        def fn(nulls: dict[str, NullPeer]) -> tuple[str, NullPeer]:
            n = nulls.get(a)
            if n is None:
                n = nulls[a] = NullPeer(a, ike_id, now, now, session, recent=[session])
                log.info("NULL-authenticated peer %s claims %r: first contact, nothing authenticated", a, ike_id)
                return FIRST_CONTACT, n
            n.last_seen = now
            known = session in n.recent
            if not known:
                n.session, n.sessions = session, n.sessions + 1
                n.recent = [*n.recent, session][-MAX_SESSIONS:]
            if ike_id != n.ike_id:
                c = next((c for c in n.other_ids if c.ike_id == ike_id), None)
                if c is None:
                    n.other_ids = [*n.other_ids, ClaimedId(ike_id, now, now)][-MAX_CHANGES:]
                elif not known:
                    c.last_seen, c.count = now, c.count + 1
                if not known:
                    log.warning(
                        "NULL-authenticated peer %s now claims IKE identity %r (first claimed %r on %s): "
                        "another peer, or the same one saying otherwise; NULL authentication proves neither",
                        a,
                        ike_id,
                        n.ike_id,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(n.first_seen)),
                    )
                return OTHER_IDENTITY, n
            if known:
                return SAME_SESSION, n
            log.info("NULL-authenticated peer %s: a new IKE_SA (%s): not provably the same peer as before", a, session)
            return NEW_SESSION, n

        return self._update_null(fn)


# -- reporting (derive.py) -----------------------------------------------------------------

_stores: dict[bytes, KnownPeers] = {}  # our host key (DER SPKI) -> the store of that key directory
_stores_lock = threading.Lock()


def register(directory: str | os.PathLike[str] | None) -> KnownPeers:
    """Use the store of key directory ``directory`` for SAs whose local key is that directory's host key."""
    from .hostkey import load_or_create

    host = load_or_create(directory)
    with _stores_lock:
        store = _stores.get(host.public_der)
        if store is None:
            store = _stores[host.public_der] = KnownPeers(directory)
        return store


def _store_for(local_key: bytes | None) -> KnownPeers | None:
    if local_key is None:
        return None
    store = _stores.get(local_key)
    if store is not None:
        return store
    from .hostkey import KEY_NAME, key_dir

    d = key_dir(None)
    if (d / KEY_NAME).exists() and (d / FILE_NAME).exists():
        try:
            store = register(None)
        except OSError:
            return None
        return store if _stores.get(local_key) is store else None
    return None


def reported(ike: IkeSA) -> IkeSA:
    """The IKE_SA as reported: a raw-key (BTNS) peer whose key this store held before the IKE_SA
    is LEAPOFFAITH (README "Leap of faith"); first contact and changed keys stay BTNS.

    Memoized per record object, so that the pToken template cache of ``core.derive`` (keyed by
    the records' identity) keeps hitting and the store is consulted once per IKE_SA record.
    """
    remote = ike.remote
    if remote.auth_method != AuthMethod.BTNS or not remote.public_key:
        return ike
    hit = _REPORTED.get(id(ike))
    if hit is not None and hit[0] is ike:
        return hit[1]
    out = ike
    if method_for(ike) == AuthMethod.LEAPOFFAITH:
        out = dataclasses.replace(ike, remote=dataclasses.replace(remote, auth_method=AuthMethod.LEAPOFFAITH))
    if len(_REPORTED) >= 1024:
        _REPORTED.clear()
    _REPORTED[id(ike)] = (ike, out)
    return out


#: id(record) -> (record, reported record); the strong reference keeps the id unique.
_REPORTED: dict[int, tuple[IkeSA, IkeSA]] = {}


def method_for(ike: IkeSA) -> AuthMethod:
    """BTNS or LEAPOFFAITH for a raw-key IKE_SA (``btns_vici.core.records.IkeSA``): see the module doc."""
    remote = ike.remote
    if remote.auth_method != AuthMethod.BTNS or not remote.public_key:
        return remote.auth_method
    store = _store_for(ike.local.public_key)
    if store is None:
        return AuthMethod.BTNS
    try:
        method, _ = store.note_sa(
            ike.remote_host,
            remote.public_key,
            f"{ike.local_spi}_{ike.remote_spi}" if ike.remote_spi else f"#{ike.uniqueid}",
        )
    except OSError as exc:
        log.warning("known-peers store %s unusable: %s", store.path, exc)
        return AuthMethod.BTNS
    return method


def read_pubkey(data: bytes) -> bytes:
    """PEM or DER public key -> DER SPKI."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = (
            serialization.load_pem_public_key(data)
            if b"-----BEGIN" in data
            else serialization.load_der_public_key(data)
        )
    except ValueError as exc:
        raise BtnsError(f"not a public key ({exc})", errno.EINVAL) from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


__all__ = ["Entry", "KnownPeers", "NullPeer", "fingerprint", "keyid", "method_for", "register"]
