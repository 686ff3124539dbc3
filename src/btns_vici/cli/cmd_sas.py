"""``btns sas``: the active backend's IKE and CHILD SAs, normalized (Backend.list_sas)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from . import exits
from .context import list_sas
from .describe import alg_text, spis
from .output import emit_json, table

if TYPE_CHECKING:
    from ..core.records import IkeSA

HEADERS = (
    "IKE_SA",
    "STATE",
    "LOCAL",
    "REMOTE",
    "PEER-ID",
    "AUTH",
    "CHILD_SA",
    "CHILD-STATE",
    "MODE",
    "SPI-IN/OUT",
    "ALG",
    "LOCAL-TS",
    "REMOTE-TS",
)


def rows(sas: list[IkeSA]) -> list[list[Any]]:
    """One row per CHILD_SA; an IKE_SA without children gets one row of its own."""
    out = []
    texts: dict[int, tuple[Any, str]] = {}  # id(selector) -> (it, str(it)): children share selectors

    def ts_text(selectors: tuple[Any, ...]) -> str:
        parts = []
        for ts in selectors:
            known = texts.get(id(ts))
            if known is None or known[0] is not ts:
                known = texts[id(ts)] = (ts, str(ts))
            parts.append(known[1])
        return ",".join(parts)

    for ike in sas:
        head = [
            f"{ike.name}#{ike.uniqueid}",
            ike.state,
            str(ike.local_host),
            str(ike.remote_host),
            ike.remote.ike_id,
            ike.remote.auth_method.name,
        ]
        if not ike.children:
            out.append([*head, "", "", "", "", "", "", ""])
        for c in ike.children:
            out.append(
                [
                    *head,
                    f"{c.name}#{c.uniqueid}",
                    c.state,
                    f"{c.protocol}/{c.mode}".lower(),
                    spis(c),
                    alg_text(c),
                    ts_text(c.local_ts),
                    ts_text(c.remote_ts),
                ]
            )
    return out


def select(sas: list[IkeSA], args: Any) -> list[IkeSA]:
    """--ike/--ike-id/--child/--child-id, as swanctl --list-sas and VICI's list-sas filters select."""
    ike, ike_id = getattr(args, "ike", None), getattr(args, "ike_id", None)
    child, child_id = getattr(args, "child", None), getattr(args, "child_id", None)
    out = []
    for sa in sas:
        if (ike is not None and sa.name != ike) or (ike_id is not None and sa.uniqueid != ike_id):
            continue
        if child is None and child_id is None:
            out.append(sa)
            continue
        kept = tuple(
            c
            for c in sa.children
            if (child is None or c.name == child) and (child_id is None or c.uniqueid == child_id)
        )
        if kept:
            out.append(dataclasses.replace(sa, children=kept))
    return out


def run(args: Any) -> int:
    filters = {k: getattr(args, k, None) for k in ("ike", "ike_id", "child", "child_id")}
    sas = select(list_sas(args, **filters)[0], args)
    if args.json:
        emit_json(sas)
    else:
        table(HEADERS, rows(sas))
    return exits.OK
