"""Leap of faith: BTNS between hosts nobody configured (README "Leap of faith (BTNS without configuration)").

Before IKE, the initiator asks the peer's learner (UDP, port 5386 by default) for its host key and
tells it ours (:mod:`.wire`, :mod:`.initiator`, :mod:`.responder`); both ends keep what they learned
in the known-peers store (:mod:`btns_vici.knownpeers`), and the IKE_SA then authenticates both raw
keys. Unauthenticated by definition: whoever answers for the address at first contact is believed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from typing import Any

from .. import knownpeers
from ..core.constants import AuthMethod
from ..core.errors import BtnsError

log = logging.getLogger("btns_vici.leap")

DEFAULT_PORT = 5386
_TRUE = ("1", "yes", "true", "on")
#: A successful exchange with a peer is not repeated for this long (seconds) in this process: many
#: connections to one peer cost one exchange (and stay under its learner's per-source rate limit).
RECENT_TTL = 10.0
_recent: dict[tuple[str | None, str, int], tuple[float, bytes]] = {}


def forget_recent() -> None:
    """Drop the cache of recent exchanges (the next connection to any peer runs the exchange)."""
    _recent.clear()


def enabled(options: Mapping[str, str]) -> bool:
    """Leap of faith is on for this backend: option ``leap_of_faith`` or ``$BTNS_LEAP_OF_FAITH``."""
    v = options.get("leap_of_faith")
    if v is None:
        v = os.environ.get("BTNS_LEAP_OF_FAITH", "")
    return str(v).strip().lower() in _TRUE


def port(options: Mapping[str, str]) -> int:
    return int(options.get("leap_port") or os.environ.get("BTNS_LEAP_PORT") or DEFAULT_PORT)


def _source(local: Any) -> str | None:
    """``local`` as an address to bind to; None for none or a wildcard (the kernel then picks)."""
    if local is None:
        return None
    a = knownpeers.normalize(local)
    return None if a in ("0.0.0.0", "::") else a


def requires_leap(allowed: frozenset[AuthMethod]) -> bool:
    """The demand accepts a raw key only when it is the stored one (LEAPOFFAITH without BTNS)."""
    return AuthMethod.LEAPOFFAITH in allowed and AuthMethod.BTNS not in allowed


def initiator_key(
    peer: Any, allowed: frozenset[AuthMethod], options: Mapping[str, str], session: Any = None, local: Any = None
) -> bytes:
    """The key to authenticate ``peer`` with, learned or checked by the exchange (see README).

    ``local``: the connection's own address; the exchange is sent from it, so that the peer's
    learner stores our key for the address our IKE_SA will come from (a host may have several)."""
    from ..hostkey import load_or_create
    from .charon import operator_conn_for
    from .initiator import exchange

    addr = knownpeers.normalize(peer)
    store = knownpeers.register(options.get("key_dir"))
    if session is not None:
        found = operator_conn_for(session, addr)
        if found is not None:
            raise BtnsError(
                f"leap of faith refused for {addr}: the operator's connection {found[0]!r} "
                f"({found[1]}) covers it and would be downgraded",
                errno.EACCES,
            )
    entry = store.get(addr)
    host = load_or_create(options.get("key_dir"))
    import time

    where = (options.get("netns"), addr, port(options))
    hit = _recent.get(where)
    if hit is not None and entry is not None and entry.spki == hit[1] and time.monotonic() - hit[0] < RECENT_TTL:
        store.learn(addr, hit[1], knownpeers.LEARNED_INITIATOR)  # last seen
        return hit[1]
    try:
        spki = exchange(addr, port(options), host, options.get("netns"), source=_source(local))
        if len(_recent) > 4096:
            _recent.clear()
        _recent[where] = (time.monotonic(), spki)
    except BtnsError as exc:
        if exc.errno == errno.EACCES:
            raise
        if entry is not None:  # the learner is down; charon may still know us: try the stored key
            log.info("leap of faith: %s did not answer (%s); using the stored key", addr, exc.strerror)
            return entry.spki
        raise BtnsError(
            f"no key for {addr}: it did not answer the leap-of-faith exchange on udp/{port(options)} "
            f"({exc.strerror}), and no key is configured or pinned",
            errno.ENOKEY,
        ) from None
    outcome, entry = store.learn(addr, spki, knownpeers.LEARNED_INITIATOR)
    if outcome == knownpeers.CHANGED:
        if entry.pinned or requires_leap(allowed):
            why = "the peer is pinned" if entry.pinned else "the demand requires leap of faith"
            raise BtnsError(
                f"{addr} presents a different key ({knownpeers.fingerprint(spki)}) than the one "
                f"stored ({entry.fingerprint}): a different peer; refused because {why}",
                errno.EACCES,
            )
        # BTNS only: go ahead with the key presented now; it is reported BTNS (and was logged).
    return spki


__all__ = ["DEFAULT_PORT", "enabled", "forget_recent", "initiator_key", "port", "requires_leap"]
