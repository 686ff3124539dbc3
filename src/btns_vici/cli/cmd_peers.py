"""``btns peers``: the known-peers store (the ssh ``known_hosts`` of IPsec; README "Leap of faith").

``list``: every peer with its key fingerprint, when and how it was learned, last seen, pinned,
and the other keys seen from its address since; then every NULL-authenticated peer (libreswan,
no key: ``NULL <claimed id>``, the IKE_SAs seen as CONTACTS, the other identities it claimed).
``forget ADDR``: drop the entry (the next contact is a first contact again, reported BTNS).
``pin ADDR [--key FILE]``: pin the stored key, or the key in FILE (PEM or DER SPKI, e.g. the
peer's ``host.key`` public half); a pinned peer's key change is refused whatever the demand.
Exit 5 when ADDR is not known (forget, pin).
"""

from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path

from ..knownpeers import KnownPeers, fingerprint, read_pubkey
from . import exits
from .output import emit_json, table

HEADERS = ("PEER", "FINGERPRINT", "HOW", "FIRST-SEEN", "LAST-SEEN", "PINNED", "CONTACTS", "CHANGED-KEYS")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def run(args: argparse.Namespace) -> int:
    store = KnownPeers(args.key_dir)
    if args.action == "list":
        entries, nulls = store.entries(), store.null_peers()
        if args.json:
            emit_json([e.to_json() for e in entries] + [n.to_json() for n in nulls])
        else:
            table(
                HEADERS,
                [
                    [
                        e.address,
                        e.fingerprint if e.key else e.ike_id,
                        e.how,
                        _when(e.first_seen),
                        _when(e.last_seen),
                        "yes" if e.pinned else "no",
                        e.contacts,
                        ",".join(f"{fingerprint(base64.b64decode(c.key))}x{c.count}" for c in e.changes),
                    ]
                    for e in entries
                ]
                + [
                    [
                        n.address,
                        f"NULL {n.ike_id}",
                        n.how,
                        _when(n.first_seen),
                        _when(n.last_seen),
                        "no",
                        n.sessions,
                        ",".join(f"{c.ike_id}x{c.count}" for c in n.other_ids),
                    ]
                    for n in nulls
                ],
            )
        return exits.OK
    if not args.address:
        raise exits.CliError(exits.USAGE, f"{args.action} needs a peer address")
    if args.action == "forget":
        if not store.forget(args.address):
            raise exits.CliError(exits.NOT_FOUND, f"no known peer {args.address}")
        print(f"forgot {args.address}")
        return exits.OK
    key = read_pubkey(Path(args.key).read_bytes()) if args.key else None
    try:
        e = store.pin(args.address, key)
    except OSError as exc:
        raise exits.CliError(exits.NOT_FOUND, exc.strerror or str(exc)) from None
    if args.json:
        emit_json(e.to_json())
    else:
        print(f"pinned {e.address} to {e.fingerprint}")
    return exits.OK
