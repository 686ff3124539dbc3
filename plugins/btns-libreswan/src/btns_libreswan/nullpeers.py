"""NULL-authenticated peers (RFC 7619) in the known-peers store: what NULL auth can and cannot give.

A NULL-authenticated IKE SA authenticates nothing: no key, no certificate, only an identity the
peer asserts (usually ``ID_NULL``), so there is nothing to pin and no channel binding. What it does
give: within one IKE SA the peer stays the same (the SA's keys bind every later message to the one
who completed the exchange). So each such SA gets a per-address record in the known-peers store
(:meth:`btns_vici.knownpeers.KnownPeers.note_null`): the identity first claimed, the IKE SAs
("sessions") seen, the other identities claimed since; and the SA record says which case this is
(``IkeSA.extra``, also in the pToken's ``auditString`` as ``peer_record=...``):

* ``first-contact``: the address was never seen;
* ``same-session``: an IKE SA seen before: the same session peer as then;
* ``new-session``: another IKE SA claiming the same identity: NOT provably the same peer (anyone on
  the path can claim ``ID_NULL``); an application that needs "the same peer" must treat it as a new one;
* ``other-identity``: the address claims another identity than it first did (logged).

A session is pluto's IKE SA serial in this pluto instance (its control socket's inode and change
time: a restarted pluto numbers from #1 again). An IKE SA rekey gets a new serial: it shows as a
new session, a false alarm on the safe side, never a false "same".

Option ``known_peers`` (``BTNS_KNOWN_PEERS``; default on; ``no`` turns it off) and ``key_dir``
(the store's directory, default the host-key directory). A store that cannot be written (an
unprivileged client) leaves the records unannotated, never fails a query.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Mapping

from btns_vici import knownpeers
from btns_vici.core.constants import AuthMethod
from btns_vici.core.records import IkeSA
from btns_vici.hostkey import key_dir

from . import whack

log = logging.getLogger("btns_libreswan.nullpeers")

_OFF = ("0", "no", "false", "off")
_stores: dict[str, knownpeers.KnownPeers] = {}  # one per directory: its parsed file is cached by stat


def _store(directory: str | None) -> knownpeers.KnownPeers:
    key = str(key_dir(directory))  # $BTNS_KEY_DIR resolved now
    store = _stores.get(key)
    if store is None:
        if len(_stores) > 64:
            _stores.clear()
        store = _stores[key] = knownpeers.KnownPeers(key)
    return store


def enabled(options: Mapping[str, str]) -> bool:
    v = options.get("known_peers")
    if v is None:
        v = os.environ.get("BTNS_KNOWN_PEERS", "yes")
    return str(v).strip().lower() not in _OFF


def is_null(ike: IkeSA) -> bool:
    """The peer authenticated nothing we hold a key for: NULL auth (or a raw key pluto did not vouch for)."""
    return ike.is_established and ike.remote.auth_method is AuthMethod.BTNS and not ike.remote.public_key


def instance(ctl: str) -> str:
    """This pluto's incarnation: its control socket's inode and change time (new at every start)."""
    try:
        st = os.stat(ctl)
    except OSError:
        return "pluto"
    return hashlib.sha256(f"{ctl}\0{st.st_ino}\0{st.st_ctime_ns}".encode()).hexdigest()[:12]


def session_id(pluto: str, ike: IkeSA) -> str:
    return f"pluto-{pluto}#{ike.uniqueid}"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def annotate(options: Mapping[str, str], sas: list[IkeSA]) -> list[IkeSA]:
    """``sas`` with every NULL-authenticated IKE SA noted in the store and its verdict in ``extra``."""
    if not enabled(options) or not any(is_null(ike) for ike in sas):
        return sas
    try:
        store = _store(options.get("key_dir") or None)
        pluto = instance(options.get("pluto_ctl") or os.environ.get("BTNS_PLUTO_CTL") or whack.DEFAULT_CTL)
        out = []
        for ike in sas:
            if not is_null(ike):
                out.append(ike)
                continue
            session = session_id(pluto, ike)
            verdict, rec = store.note_null(ike.remote_host, ike.remote.ike_id, session)
            record = (
                f"{verdict}: {rec.how} {rec.address} claims {ike.remote.ike_id!r} (first claimed {rec.ike_id!r} "
                f"{_stamp(rec.first_seen)}), session {session}, {rec.sessions} sessions seen"
            )
            extra = {
                **ike.extra,
                "null_peer": verdict,
                "null_session": session,
                "null_first_seen": _stamp(rec.first_seen),
                "null_sessions": str(rec.sessions),
                "peer_record": record,
            }
            out.append(dataclasses.replace(ike, extra=extra))
        return out
    except OSError as exc:  # an unwritable store (unprivileged), a broken file: no record, same answers
        log.debug("known-peers store unusable for NULL peers: %s", exc)
        return sas


__all__ = ["annotate", "enabled", "instance", "is_null", "session_id"]
