"""charon's SAs as records, fresh: list-sas, list-conns and list-certs over one VICI session.

What the backend's ``btns_list_sas`` hook answers (:meth:`.plugin.Context.list_sas`), in a module
of its own so that ``btns sas`` of the built-in backend needs neither the plugin manager nor the
enforcement, event and data-plane modules the plugin imports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..core.records import IkeSA
from . import parse
from .session import DEFAULT_SOCKET, ViciSession


def socket_path(options: Mapping[str, str]) -> str:
    """Option ``vici_socket``, else ``$BTNS_VICI_SOCKET``, else charon's default."""
    return options.get("vici_socket") or os.environ.get("BTNS_VICI_SOCKET") or DEFAULT_SOCKET


def list_records(
    session: ViciSession,
    *,
    ike: str | None = None,
    ike_id: str | None = None,
    child: str | None = None,
    child_id: str | None = None,
) -> list[IkeSA]:
    """Every IKE_SA with its CHILD_SAs (by uniqueid) and both ends' identities.

    The filters are list-sas's (``swanctl --list-sas --ike`` ...): charon lists only those IKE_SAs
    and CHILD_SAs, so a filtered listing costs what it shows. charon reads a non-numeric id as no
    filter and keeps IKE_SAs left without children: callers that need exact selection still select.
    """
    sas = session.list_sas(ike_id=ike_id, child_id=child_id, ike=ike, child=child)
    conns: dict[str, Any] = {}
    for c in session.list_conns(ike):
        conns.update(c)
    store = parse.CertStore.from_vici(session.list_certs())
    out = []
    for entry in sas:
        name, sec = parse.single_section(entry, "list-sas entry")
        conn = conns.get(name)
        lauth = parse.conn_auth(conn, "local") if conn else None
        rauth = parse.conn_auth(conn, "remote") if conn else None
        local = parse.identity(parse.text(sec.get("local-id", b"")), lauth, store)
        remote = parse.identity(parse.text(sec.get("remote-id", b"")), rauth, store)
        kids = sorted(parse.children_of(sec).values(), key=lambda c: int(c.uniqueid))
        out.append(parse.parse_ike(name, sec, local, remote, kids))
    return out
