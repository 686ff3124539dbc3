"""A coverage cache shared between processes: which child configs could cover a flow, per charon.

charon's VICI has one source of configured selectors, ``list-conns``, and it builds that
reply at ~0.05 ms per child config (a connection with 2,500 children: ~135 ms): a fresh
process that must learn which child config could cover its flow pays that before its
first answer. The first process that fetched them writes them here, so later processes
look the flow up in one small file instead.

The file is a *hint*, never an answer: it only names the candidate child configs (and the
connections' auth rounds), the SA index still lists the live CHILD_SA by name from charon
and matches the flow against its negotiated selectors, the data-plane proof follows, and a
negative answer found through the cache is redone from charon's live configuration.

Safety:

* keyed by charon's identity: the VICI socket's path, inode and ctime (a restarted charon
  binds a new socket): another charon's or a previous charon's file is ignored;
* per connection, valid only for IKE_SAs whose uniqueid is not newer than the newest IKE_SA
  the writer knew when it fetched that configuration (a connection reloaded and brought up
  again is re-read, the same rule as the in-process configuration cache), and not for those
  that were not established then (``pending``: a responder's IKE_SA has its uniqueid from
  IKE_SA_INIT on but picks its configuration at IKE_AUTH, perhaps one reloaded meanwhile);
* the directory is created 0700, the file written 0600 by an atomic rename; a file not owned
  by this effective uid, readable or writable by others, a symlink, over :data:`MAX_BYTES`
  or malformed in any way is ignored (logged), never raised.

Format (text, looked up without parsing the whole file): a JSON header line, then one line
per lookup key and child config: ``R <v> <addr> <proto> <port>`` (configured remote selector
naming one address, protocol and port), ``L ...`` (the same for the local selector), or ``W``
(anything wider), a tab, and ``[conn, child, local, remote]`` with the compiled selectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _Log:
    """This module's logger, made on first use: importing :mod:`logging` costs ~8 ms, and
    ``btns sas`` reads the cache on every run but logs only when a file is malformed."""

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger(__name__), name)


log = _Log()

VERSION = 2  # (2: per connection, the IKE_SAs not established when it was fetched)
#: Largest cache file read or written (the configurations of ~40,000 per-port child configs).
MAX_BYTES = 4 << 20
#: Deepest nesting accepted in a cached auth section (charon's are two levels deep).
MAX_DEPTH = 8
DEFAULT_DIR = "/run/btns-vici/cache"
#: The connections the library loads (enforce.conn_name): one child, named like the connection,
#: protecting the two hosts of its IKE_SA (local_ts = local host, remote_ts = remote host or dynamic).
LIBRARY_CONN = re.compile(r"btns-(init|resp)-[0-9a-f]{12}")
#: (Never cached: their one child is found by name, between the IKE_SA's two hosts.)

Sel = tuple[tuple[int, int, int, int, int, int], ...]


def cache_dir() -> Path:
    return Path(os.environ.get("BTNS_CACHE_DIR") or DEFAULT_DIR)


def charon_identity(vici_path: str) -> list[Any] | None:
    """[path, inode, ctime_ns] of charon's VICI socket, None when it is not there."""
    try:
        st = os.stat(vici_path)
    except OSError:
        return None
    return [os.path.abspath(vici_path), st.st_ino, st.st_ctime_ns]


def cache_file(vici_path: str) -> Path:
    digest = hashlib.sha256(os.path.abspath(vici_path).encode()).hexdigest()[:16]
    return cache_dir() / f"coverage-{digest}.idx"


class Invalid(Exception):
    """The cache file is not usable (reason in the message); never leaves this module's callers."""


def _enc(obj: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise Invalid("auth section nested too deep")
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    if isinstance(obj, Mapping):
        return {str(k): _enc(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_enc(v, depth + 1) for v in obj]
    raise Invalid(f"cannot cache a {type(obj).__name__}")


def _dec(obj: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise Invalid("auth section nested too deep")
    if isinstance(obj, str):
        return obj.encode("latin-1")
    if isinstance(obj, dict):
        return {k: _dec(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_dec(v, depth + 1) for v in obj]
    raise Invalid(f"bad value type {type(obj).__name__} in auth section")


def _sel(raw: Any) -> Sel:
    if not isinstance(raw, list):
        raise Invalid("selectors are not a list")
    out = []
    for t in raw:
        if (
            not isinstance(t, list)
            or len(t) != 6
            or not all(type(x) is int and x >= 0 for x in t)
            or t[0] not in (4, 6)
            or t[1] > t[2]
            or t[3] > 255
            or t[4] > t[5]
            or t[5] > 65535
        ):
            raise Invalid("malformed selector")
        out.append((t[0], t[1], t[2], t[3], t[4], t[5]))
    return tuple(out)


def _exact_key(sel: Sel) -> list[str]:
    keys = []
    for v, first, last, proto, lo, hi in sel:
        if first != last or proto == 0 or lo != hi:
            return []
        keys.append(f"{v} {first} {proto} {lo}")
    return keys


def match(sel: Sel, addr: tuple[int, int], proto: int, port: int) -> bool:
    """TrafficSelector.covers over compiled selectors (same semantics, no objects on the hot path)."""
    version, value = addr
    for v, first, last, p, lo, hi in sel:
        if v == version and first <= value <= last and (p == 0 or (p == proto and lo <= port <= hi)):
            return True
    return False


#: IKE_SA states in which its configuration (and so its authentication) is settled.
SETTLED = frozenset({b"ESTABLISHED", b"REKEYING"})


@dataclass(frozen=True)
class ConnEntry:
    """One connection in the cache: its auth rounds, the newest IKE_SA uniqueid it is valid for
    and the older ones it is not (not established when the configuration was fetched)."""

    max_ike: int
    local: Mapping[str, Any] | None
    remote: Mapping[str, Any] | None
    pending: frozenset[int] = frozenset()

    def serves(self, uniqueid: str) -> bool:
        """This entry holds the configuration IKE_SA ``uniqueid`` was authenticated with (as far as
        list-conns can tell): it was established when the configuration was fetched."""
        if not (uniqueid.isascii() and uniqueid.isdigit()):
            return False
        uid = int(uniqueid)
        return uid <= self.max_ike and uid not in self.pending


@dataclass
class Coverage:
    """A read cache file: its connections, and the text its per-flow lines are looked up in."""

    conns: dict[str, ConnEntry]
    text: str

    def children_of(self, conn: str) -> dict[str, tuple[Sel, Sel]]:
        """{child config name: (local, remote) configured selectors} cached for connection ``conn``."""
        out: dict[str, tuple[Sel, Sel]] = {}
        needle = "\t" + json.dumps([conn])[:-1] + ","
        at = self.text.find(needle)
        while at >= 0:
            end = self.text.find("\n", at)
            if end < 0:
                raise Invalid("truncated line")
            try:
                name, child, lraw, rraw = json.loads(self.text[at + 1 : end])
            except (ValueError, TypeError) as exc:
                raise Invalid(f"malformed line: {exc}") from None
            if name != conn or not isinstance(child, str):
                raise Invalid("malformed line")
            out[child] = (_sel(lraw), _sel(rraw))
            at = self.text.find(needle, end)
        return out

    def candidates(
        self, version: int, laddr: int, lport: int, raddr: int, rport: int, proto: int
    ) -> dict[str, set[str]]:
        """{connection: child config names whose cached configured selectors could cover the flow}."""
        out: dict[str, set[str]] = {}
        lkey, rkey = (version, laddr), (version, raddr)
        for needle in (f"\nR {version} {raddr} {proto} {rport}\t", f"\nL {version} {laddr} {proto} {lport}\t", "\nW\t"):
            at = self.text.find(needle)
            while at >= 0:
                end = self.text.find("\n", at + len(needle))
                if end < 0:
                    raise Invalid("truncated line")
                try:
                    conn, child, lraw, rraw = json.loads(self.text[at + len(needle) : end])
                except (ValueError, TypeError) as exc:
                    raise Invalid(f"malformed line: {exc}") from None
                if not isinstance(conn, str) or not isinstance(child, str) or conn not in self.conns:
                    raise Invalid("line names no cached connection")
                if match(_sel(lraw), lkey, proto, lport) and match(_sel(rraw), rkey, proto, rport):
                    out.setdefault(conn, set()).add(child)
                at = self.text.find(needle, end)
        return out


def read(vici_path: str) -> Coverage | None:
    """The cache for charon at ``vici_path``, None when absent, foreign, stale or malformed."""
    ident = charon_identity(vici_path)
    path = cache_file(vici_path)
    if ident is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("ignoring coverage cache %s: not a private file of uid %d", path, os.geteuid())
            return None
        if st.st_size > MAX_BYTES:
            log.warning("ignoring coverage cache %s: %d bytes (limit %d)", path, st.st_size, MAX_BYTES)
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        log.info("coverage cache %s unreadable: %s", path, exc)
        return None
    finally:
        os.close(fd)
    try:
        if len(raw) > MAX_BYTES:
            raise Invalid("grew over the limit")
        text = raw.decode("utf-8")
        head, nl, _ = text.partition("\n")
        if not nl or not text.endswith("\n"):
            raise Invalid("truncated")
        hdr = json.loads(head)
        if not isinstance(hdr, dict) or hdr.get("version") != VERSION:
            raise Invalid("unknown version")
        if hdr.get("charon") != ident:
            return None  # another (or a restarted) charon: stale, silently
        conns_raw = hdr.get("conns")
        if not isinstance(conns_raw, dict):
            raise Invalid("no connections")
        conns = {}
        for name, c in conns_raw.items():
            if not isinstance(c, dict) or type(c.get("max_ike")) is not int:
                raise Invalid(f"malformed connection {name!r}")
            pending = c.get("pending")
            if not isinstance(pending, list) or not all(type(u) is int for u in pending):
                raise Invalid(f"malformed connection {name!r}")
            local, remote = c.get("local"), c.get("remote")
            conns[name] = ConnEntry(
                c["max_ike"],
                None if local is None else _dec(local),
                None if remote is None else _dec(remote),
                frozenset(pending),
            )
            if not all(x is None or isinstance(x, dict) for x in (conns[name].local, conns[name].remote)):
                raise Invalid("auth round is not a section")
    except (Invalid, ValueError, TypeError, RecursionError) as exc:
        log.warning("ignoring coverage cache %s: %s", path, exc)
        return None
    return Coverage(conns, "\n" + text[len(head) + 1 :])


@dataclass(frozen=True)
class ConnConfig:
    """What the writer knows of one connection: fetched live from charon (``pending``: the IKE_SAs
    up to ``max_ike`` not established then, see :class:`ConnEntry`)."""

    max_ike: int
    local: Mapping[str, Any] | None
    remote: Mapping[str, Any] | None
    children: Mapping[str, tuple[Sel, Sel]]
    pending: frozenset[int] = frozenset()


def known_ikes(sas: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[int, frozenset[int]]:
    """(newest uniqueid, those not established) of IKE_SA sections [(name, section)] listed before
    a configuration was fetched: what a :class:`ConnConfig` of it is valid for."""
    newest, pending = 0, set()
    for _name, sec in sas:
        raw = sec.get("uniqueid", b"")
        uid = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        if not (uid.isascii() and uid.isdigit()):
            continue
        newest = max(newest, int(uid))
        state = sec.get("state")
        if not isinstance(state, bytes) or state not in SETTLED:
            pending.add(int(uid))
    return newest, frozenset(pending)


def render(vici_path: str, conns: Mapping[str, ConnConfig], keep: Coverage | None = None) -> bytes | None:
    """The cache file's bytes for ``conns`` (and ``keep``'s other connections, copied); None when
    charon is gone or it would exceed :data:`MAX_BYTES`."""
    ident = charon_identity(vici_path)
    if ident is None:
        return None
    kept = {n: e for n, e in keep.conns.items() if n not in conns} if keep is not None else {}
    hdr = {
        "version": VERSION,
        "charon": ident,
        "conns": {
            n: {
                "max_ike": c.max_ike,
                "pending": sorted(c.pending),
                "local": None if c.local is None else _enc(c.local),
                "remote": None if c.remote is None else _enc(c.remote),
            }
            for n, c in conns.items()
        },
    }
    for n, e in kept.items():
        hdr["conns"][n] = {  # type: ignore[index]
            "max_ike": e.max_ike,
            "pending": sorted(e.pending),
            "local": None if e.local is None else _enc(e.local),
            "remote": None if e.remote is None else _enc(e.remote),
        }
    lines = [json.dumps(hdr, separators=(",", ":"))]
    if keep is not None and kept:
        prefixes = tuple("\t" + json.dumps([n])[:-1] + "," for n in kept)
        lines.extend(ln for ln in keep.text.split("\n") if ln and any(p in ln for p in prefixes))
    size = sum(len(ln) + 1 for ln in lines)
    for n, c in conns.items():
        for child, (lsel, rsel) in c.children.items():
            entry = json.dumps([n, child, lsel, rsel], separators=(",", ":"))
            keys: Iterable[str] = [f"R {k}" for k in _exact_key(rsel)] or [f"L {k}" for k in _exact_key(lsel)] or ["W"]
            for k in keys:
                lines.append(f"{k}\t{entry}")
                size += len(lines[-1]) + 1
                if size > MAX_BYTES:
                    return None
    return ("\n".join(lines) + "\n").encode()


def write(vici_path: str, conns: Mapping[str, ConnConfig], keep: Coverage | None = None) -> bool:
    """Atomically replace the cache for charon at ``vici_path``; False (logged) when it cannot."""
    try:
        data = render(vici_path, conns, keep)
    except Invalid as exc:
        log.info("coverage cache not written: %s", exc)
        return False
    if data is None:
        return False
    path = cache_file(vici_path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path.parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("coverage cache not written: %s is not a private directory", path.parent)
            return False
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".coverage-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp: mode 0600
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.info("coverage cache not written: %s", exc)
        return False
    return True
