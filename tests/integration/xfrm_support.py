"""Test helpers for the XFRM tests (host and VM): btns-vm- network namespaces, and a parser of
``ip -s xfrm policy|state`` text into the same flat dicts :func:`view` makes from our records,
so that iproute2 and :mod:`btns_vici.xfrm` can be compared field by field."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

from btns_vici import netns as _netns
from btns_vici.xfrm import XFRM_INF, XfrmPolicy, XfrmState

_counter = itertools.count()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run iproute2's ``ip`` (in ``netns`` if given) and return its stdout."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def netns(tag: str = "x") -> Iterator[str]:
    """A fresh network namespace ``btns-vm-<tag>-<pid>-<n>`` with lo up, deleted afterwards."""
    name = f"btns-vm-{tag}-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip("link", "set", "lo", "up", netns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def socket_in(ns: str, *args: int) -> socket.socket:
    """A socket created in network namespace ``ns`` (it stays there)."""
    with _netns.entered(ns):
        return socket.socket(*args)


# ---- iproute2 text -> dicts ----


def _num(tok: str) -> int:
    """'0x054d0902(88934658)', '5(0x00000005)', '(INF)(bytes)', '30(sec)' -> int."""
    head = tok.split("(")[0] if not tok.startswith("(") else tok
    if head.startswith("(INF)"):
        return XFRM_INF
    return int(head, 0)


def _pairs(words: list[str], keys: set[str]) -> dict[str, str]:
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w in keys}


def _selector(words: list[str]) -> dict[str, Any]:
    kv = _pairs(words, {"src", "dst", "proto", "sport", "dport", "type", "code", "dev"})
    src, _, plen_s = kv["src"].partition("/")
    dst, _, plen_d = kv["dst"].partition("/")
    proto = kv.get("proto", "0")
    return {
        "saddr": src,
        "daddr": dst,
        "prefixlen_s": int(plen_s or 0),
        "prefixlen_d": int(plen_d or 0),
        "proto": socket.getprotobyname(proto) if not proto.isdigit() else int(proto),
        "sport": int(kv.get("sport", kv.get("type", 0))),
        "dport": int(kv.get("dport", kv.get("code", 0))),
    }


def parse_ip_xfrm(text: str) -> list[dict[str, Any]]:
    """Parse ``ip -s xfrm policy`` or ``ip -s xfrm state`` output into one dict per entry."""
    records: list[dict[str, Any]] = []
    rec: dict[str, Any] = {}
    tmpl: dict[str, Any] | None = None
    lines = text.splitlines()
    for n, line in enumerate(lines):
        words = line.split()
        if not words:
            continue
        head = words[0]
        if not line[0].isspace():  # "src A dst B ...": a new entry
            rec, tmpl = {"first": words, "templates": [], "algorithms": {}}, None
            records.append(rec)
        elif head in ("dir", "socket"):
            rec["socket"] = head == "socket"
            rec.update(dir=words[1], **{k: v for k, v in _pairs(words, {"action", "index", "priority"}).items()})
        elif head == "tmpl":
            tmpl = _pairs(words, {"src", "dst"})
            rec["templates"].append(tmpl)
        elif head == "proto":
            target = tmpl if tmpl is not None else rec
            target.update(_pairs(words, {"proto", "spi", "reqid", "mode"}))
        elif head == "level" and tmpl is not None:
            tmpl["level"] = words[1]
        elif head == "sel":
            rec["sel"] = _selector(words[1:])
        elif head == "mark":
            v, _, m = words[1].partition("/")
            rec["mark"] = (int(v, 0), int(m, 0))
        elif head == "if_id":
            rec["if_id"] = int(words[1], 0)
        elif head in ("enc", "auth", "auth-trunc", "aead", "comp"):
            kind = {"enc": "crypt", "auth-trunc": "auth"}.get(head, head)
            key_bits = (len(words[2]) - 2) * 4 if len(words) > 2 and words[2].startswith("0x") else 0
            rec["algorithms"][kind] = (words[1], key_bits)
        elif head == "encap":
            kv = _pairs(words, {"type", "sport", "dport"})
            rec["encap"] = (kv["type"], int(kv["sport"]), int(kv["dport"]))
        elif head == "replay-window" and "seq" in words:
            rec["replay_window"] = int(words[1])
        elif head == "limit:":
            unit = "byte" if "(bytes)" in line else "packet"
            rec[f"soft_{unit}_limit"], rec[f"hard_{unit}_limit"] = _num(words[2].rstrip(",")), _num(words[4])
        elif head == "expire":
            rec[f"soft_{words[1][:-1]}_expires"], rec[f"hard_{words[1][:-1]}_expires"] = (
                _num(words[3].rstrip(",")),
                _num(words[5]),
            )
        elif head == "lifetime" and words[1] == "current:":
            cur = lines[n + 1].split()
            rec["bytes"], rec["packets"] = _num(cur[0]), _num(cur[1])
    out = []
    for r in records:
        first = r.pop("first")
        if "dir" in r:  # a policy: the first line is its selector
            r["sel"] = _selector(first)
            for k in ("index", "priority"):
                r[k] = int(r[k])
        else:  # a state: the first line is its address pair
            r.update(_pairs(first, {"src", "dst"}))
            r["spi"], r["reqid"] = _num(r["spi"]), _num(r["reqid"])
        for t in r["templates"]:
            t["spi"], t["reqid"] = _num(t["spi"]), _num(t["reqid"])
        out.append(r)
    return out


def _sel_view(sel: Any) -> dict[str, Any]:
    return {
        "saddr": str(sel.saddr),
        "daddr": str(sel.daddr),
        "prefixlen_s": sel.prefixlen_s,
        "prefixlen_d": sel.prefixlen_d,
        "proto": sel.proto,
        "sport": sel.sport,
        "dport": sel.dport,
    }


def _lifetime_view(lft: Any) -> dict[str, int]:
    return {
        "soft_byte_limit": lft.soft_byte_limit,
        "hard_byte_limit": lft.hard_byte_limit,
        "soft_packet_limit": lft.soft_packet_limit,
        "hard_packet_limit": lft.hard_packet_limit,
        "soft_add_expires": lft.soft_add_expires_seconds,
        "hard_add_expires": lft.hard_add_expires_seconds,
        "soft_use_expires": lft.soft_use_expires_seconds,
        "hard_use_expires": lft.hard_use_expires_seconds,
    }


def view(rec: XfrmPolicy | XfrmState) -> dict[str, Any]:
    """Our record in the shape :func:`parse_ip_xfrm` gives iproute2's text."""
    out: dict[str, Any] = {
        "sel": _sel_view(rec.sel),
        **_lifetime_view(rec.lifetime),
        "bytes": rec.current.bytes,
        "packets": rec.current.packets,
        "templates": [],
        "algorithms": {},
    }
    if rec.mark is not None:
        out["mark"] = (rec.mark.value, rec.mark.mask)
    if rec.if_id:
        out["if_id"] = rec.if_id
    if isinstance(rec, XfrmPolicy):
        out.update(
            socket=rec.is_socket, dir=rec.direction, action=rec.action_name, index=rec.index, priority=rec.priority
        )
        out["templates"] = [
            {
                "src": str(t.saddr),
                "dst": str(t.daddr),
                "proto": t.proto_name,
                "spi": t.spi,
                "reqid": t.reqid,
                "mode": t.mode_name,
                "level": t.level,
            }
            for t in rec.templates
        ]
    else:
        out.update(
            src=str(rec.saddr),
            dst=str(rec.daddr),
            proto=rec.proto_name,
            spi=rec.spi,
            reqid=rec.reqid,
            mode=rec.mode_name,
            replay_window=rec.replay_window,
        )
        out["algorithms"] = {a.kind: (a.name, a.key_bits) for a in rec.algorithms}
        if rec.encap is not None:
            out["encap"] = (
                {2: "espinudp", 1: "espinudp-nonike"}.get(rec.encap.type, str(rec.encap.type)),
                rec.encap.sport,
                rec.encap.dport,
            )
    return out
