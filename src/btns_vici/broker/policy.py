"""btnsd's configuration (``conf/btnsd.toml``, parsed with tomllib): backends, who may demand what, quotas.

Pure apart from reading the file: :func:`load` turns TOML into a frozen :class:`Config`;
:meth:`Config.allows` answers whether a caller (uid, gids) may demand an authentication
method towards a peer address.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.constants import AuthMethod
from ..core.errors import BtnsError

DEFAULT_SOCKET = "/run/btns-vici/btnsd.sock"


@dataclass(frozen=True)
class Rule:
    """One ``[[allow]]`` entry: callers (users/groups, "*" for anyone) -> methods and peers they may demand."""

    users: frozenset[str] = frozenset({"*"})
    groups: frozenset[str] = frozenset()
    methods: frozenset[AuthMethod] = frozenset(AuthMethod)
    peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )

    def matches(self, uid: int, gids: frozenset[int]) -> bool:
        if "*" in self.users or str(uid) in self.users or _user(uid) in self.users:
            return True
        return any(str(g) in self.groups or _group(g) in self.groups for g in gids)


@dataclass(frozen=True)
class Quota:
    """Per uid: connections the broker loads into the IKE daemon, requests per second, concurrent slow requests."""

    connections: int = 64
    requests_per_second: float = 5000.0
    burst: int = 1000
    concurrent: int = 16


@dataclass(frozen=True)
class Config:
    socket: str = DEFAULT_SOCKET
    max_clients: int = 4096
    max_clients_per_uid: int = 1024
    idle_timeout: float = 600.0
    request_timeout: float = 60.0
    #: worker processes reading clients (``[broker] workers``; None: os.cpu_count() capped at 4; 1: none)
    workers: int | None = None
    backends: tuple[Mapping[str, str], ...] = ({"name": ""},)
    rules: tuple[Rule, ...] = (Rule(),)
    quota: Quota = field(default_factory=Quota)

    def allows(self, uid: int, gids: frozenset[int], method: AuthMethod | None, peer: Any = None) -> str | None:
        """None when allowed, else why not (the first matching rule decides; no rule: refused)."""
        if uid == 0:
            return None
        for rule in self.rules:
            if not rule.matches(uid, gids):
                continue
            if method is not None and method not in rule.methods:
                return f"uid {uid} may not demand {method.name} (btnsd.toml [[allow]])"
            if peer is not None and not any(peer in net for net in rule.peers if net.version == peer.version):
                return f"uid {uid} may not demand protection towards {peer} (btnsd.toml [[allow]] peers)"
            return None
        return f"no [[allow]] rule in btnsd.toml matches uid {uid}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _strings(v: Any, what: str) -> frozenset[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) for x in v):
        raise BtnsError(f"btnsd.toml: {what} must be a list of names", errno.EINVAL)
    return frozenset(str(x) for x in v)


def parse(data: Mapping[str, Any]) -> Config:
    """A Config from parsed TOML (EINVAL naming the bad key)."""
    b = data.get("broker", {})
    rules = []
    for entry in data.get("allow", [{"users": ["*"]}]):
        methods = entry.get("methods")
        try:
            ms = frozenset(AuthMethod[m] for m in methods) if methods is not None else frozenset(AuthMethod)
            peers = tuple(ipaddress.ip_network(p, strict=False) for p in entry.get("peers", ["0.0.0.0/0", "::/0"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise BtnsError(f"btnsd.toml [[allow]]: {exc}", errno.EINVAL) from None
        rules.append(
            Rule(_strings(entry.get("users", []), "users"), _strings(entry.get("groups", []), "groups"), ms, peers)
        )
    q = data.get("quota", {})
    try:
        quota = Quota(
            int(q.get("connections", 64)),
            float(q.get("requests_per_second", 5000)),
            int(q.get("burst", 1000)),
            int(q.get("concurrent", 16)),
        )
        backends = tuple({str(k): str(v) for k, v in be.items()} for be in data.get("backend", [{"name": ""}]))
        return Config(
            socket=str(b.get("socket", DEFAULT_SOCKET)),
            max_clients=int(b.get("max_clients", 4096)),
            max_clients_per_uid=int(b.get("max_clients_per_uid", 1024)),
            idle_timeout=float(b.get("idle_timeout", 600)),
            request_timeout=float(b.get("request_timeout", 60)),
            workers=_workers(b.get("workers")),
            backends=backends,
            rules=tuple(rules),
            quota=quota,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise BtnsError(f"btnsd.toml: {exc}", errno.EINVAL) from None


def _workers(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
        raise BtnsError(f"btnsd.toml: [broker] workers must be an integer from 1 to 64, got {v!r}", errno.EINVAL)
    return v


def load(path: str | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            return parse(tomllib.load(f))
    except OSError as exc:
        raise BtnsError(f"cannot read {path}: {exc.strerror}", exc.errno) from None
    except tomllib.TOMLDecodeError as exc:
        raise BtnsError(f"{path}: {exc}", errno.EINVAL) from None
