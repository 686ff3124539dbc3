"""A minimal btns-vici backend: the SAs of a static table, the library's real data-plane proof.

What a backend must do (docs/backends.md) and nothing more: its own parsing (here a JSON file
instead of a daemon's replies) into :mod:`btns_vici.core.records`; everything else comes from
:mod:`btns_vici.backendkit` (lookup, the data-plane proof, the watch thread). It cannot enforce
or negotiate: those hooks are not implemented, so the core answers EOPNOTSUPP for them.

Options:

* ``sa_table``: the JSON file, ``{"ike_sas": [IKE_SA, ...]}`` (see :func:`parse_table`);
* ``dataplane``: ``kernel-libipsec`` (default) or ``kernel-xfrm``, the proof to run;
* ``netns``: the network namespace the SAs and sockets live in (default: ours).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from btns_vici import backendkit
from btns_vici.backend import BackendInfo, Capabilities, SAEvent
from btns_vici.core.constants import AuthMethod
from btns_vici.core.errors import BackendError, ProtocolError
from btns_vici.core.records import LIBIPSEC, XFRM, ChildSA, DataplaneProof, Identity, IkeSA, NotCarried, SocketView
from btns_vici.core.selectors import Flow, TrafficSelector
from btns_vici.hookspecs import hookimpl

NAME = "minimal"
#: The largest table read (a daemon's reply is size-limited too).
MAX_TABLE = 1 << 20


def _selectors(raw: Any, where: str) -> tuple[TrafficSelector, ...]:
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(f"{where}: a non-empty list of networks is needed")
    return tuple(TrafficSelector.from_network(str(net)) for net in raw)


def _child(raw: Mapping[str, Any], where: str) -> ChildSA:
    return ChildSA(
        name=str(raw["name"]),
        uniqueid=str(raw.get("uniqueid", "1")),
        reqid=int(raw.get("reqid", 1)),
        state=str(raw.get("state", "INSTALLED")),
        mode=str(raw.get("mode", "TUNNEL")).upper(),
        protocol=str(raw.get("protocol", "ESP")).upper(),
        spi_in=int(str(raw["spi_in"]), 16),
        spi_out=int(str(raw["spi_out"]), 16),
        encr_alg=raw.get("encr_alg"),
        encr_keysize=raw.get("encr_keysize"),
        integ_alg=raw.get("integ_alg"),
        local_ts=_selectors(raw.get("local_ts"), f"{where}.local_ts"),
        remote_ts=_selectors(raw.get("remote_ts"), f"{where}.remote_ts"),
    )


def _ike(raw: Mapping[str, Any], i: int) -> IkeSA:
    where = f"ike_sas[{i}]"
    key = raw.get("remote_key")
    method = AuthMethod[str(raw.get("auth", "BTNS"))]
    return IkeSA(
        backend=NAME,
        name=str(raw["name"]),
        uniqueid=str(raw.get("uniqueid", i + 1)),
        version=2,
        state=str(raw.get("state", "ESTABLISHED")),
        local_host=ipaddress.ip_address(str(raw["local_host"])),
        remote_host=ipaddress.ip_address(str(raw["remote_host"])),
        local=Identity(str(raw.get("local_id", raw["local_host"])), method),
        remote=Identity(
            str(raw.get("remote_id", raw["remote_host"])), method, public_key=bytes.fromhex(key) if key else None
        ),
        children=tuple(_child(c, f"{where}.children[{j}]") for j, c in enumerate(raw.get("children", []))),
    )


def parse_table(data: bytes) -> list[IkeSA]:
    """The backend's own parsing: the JSON table -> records (EPROTO, saying where, if malformed)."""
    if len(data) > MAX_TABLE:
        raise ProtocolError(f"SA table of {len(data)} bytes, over the limit of {MAX_TABLE}")
    try:
        doc = json.loads(data)
        return [_ike(raw, i) for i, raw in enumerate(doc["ike_sas"])]
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed SA table: {type(exc).__name__}: {exc}") from None


def _path(options: Mapping[str, str]) -> str:
    path = options.get("sa_table")
    if not path:
        raise BackendError("backend minimal needs option sa_table (a JSON file of SAs)")
    return path


def list_sas(options: Mapping[str, str]) -> list[IkeSA]:
    """The table, read fresh (no cache: never stale)."""
    path = _path(options)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TABLE + 1)
    except OSError as exc:
        raise BackendError(f"SA table {path} cannot be read: {exc.strerror}") from None
    return parse_table(data)


def _dataplane(options: Mapping[str, str]) -> str:
    kind = options.get("dataplane", LIBIPSEC)
    if kind not in (LIBIPSEC, XFRM):
        raise BackendError(f"option dataplane must be {LIBIPSEC} or {XFRM}, not {kind!r}", errno.EINVAL)
    return kind


class MinimalBackend:
    """The pluggy plugin object (entry point ``minimal = btns_backend_minimal:plugin``)."""

    @hookimpl
    def btns_backend_info(self) -> BackendInfo:
        return BackendInfo(NAME, "a static SA table (JSON)", "example backend: SAs from a file, real data-plane proof")

    @hookimpl
    def btns_probe(self, options: Mapping[str, str]) -> bool:
        return bool(options.get("sa_table")) and os.path.isfile(options["sa_table"])

    @hookimpl
    def btns_capabilities(self, options: Mapping[str, str]) -> Capabilities:
        kind = _dataplane(options)
        modes = frozenset({"TUNNEL"}) if kind == LIBIPSEC else frozenset({"TUNNEL", "TRANSPORT"})
        return Capabilities(auth_methods=frozenset({AuthMethod.BTNS}), modes=modes, dataplane=kind)

    @hookimpl
    def btns_list_sas(self, options: Mapping[str, str]) -> list[IkeSA]:
        return list_sas(options)

    @hookimpl
    def btns_find_sa(self, options: Mapping[str, str], flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        return backendkit.find_in(list_sas(options), flow)

    @hookimpl
    def btns_verify_dataplane(
        self, options: Mapping[str, str], flow: Flow, ike_sa: IkeSA, child_sa: ChildSA, view: SocketView
    ) -> DataplaneProof | NotCarried | None:
        return backendkit.verify_dataplane(
            NAME, view, ike_sa, child_sa, _dataplane(options), options.get("netns") or None
        )

    @hookimpl
    def btns_watch(self, options: Mapping[str, str], callback: Callable[[SAEvent], None]) -> Callable[[], None]:
        """A ``reset`` whenever the table file changes (its mtime), polled every ``poll_interval`` s."""
        path = _path(options)
        last = [os.stat(path).st_mtime_ns]

        def poll() -> list[SAEvent]:
            now = os.stat(path).st_mtime_ns
            changed, last[0] = now != last[0], now
            return [SAEvent("reset")] if changed else []

        interval = float(options.get("poll_interval", "0.2"))
        return backendkit.watch_thread("btns-minimal-watch", poll, callback, interval=interval, resume=True)


plugin = MinimalBackend()

__all__ = ["MinimalBackend", "list_sas", "parse_table", "plugin"]
