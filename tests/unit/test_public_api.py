"""The public API the README documents exists (issue 13), and the attach registry does not leak."""

from __future__ import annotations

import importlib
import re
import socket
from pathlib import Path

import pytest

import btns_vici
from btns_vici import api
from btns_vici.core.tokens import PToken
from btns_vici.sockets import socket_key

README = Path(__file__).resolve().parents[2] / "README.md"


def _resolve(dotted: str) -> object:
    """``btns_vici.a.b.c`` as a module or attribute chain (importing submodules on the way)."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    path = parts[0]
    for part in parts[1:]:
        path += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        obj = importlib.import_module(path)
    return obj


def readme_names() -> list[str]:
    names = set(re.findall(r"\bbtns_vici(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README.read_text()))
    return sorted(n for n in names if not n.startswith("btns_vici.backends.")) or ["btns_vici"]


@pytest.mark.parametrize("name", readme_names())
def test_every_name_the_readme_uses_exists(name):
    _resolve(name)


def test_socket_calls_are_exported():
    for name in ("connect", "listen", "accept", "get_socket_ptoken", "set_socket_ptoken"):
        assert callable(getattr(btns_vici, name)) and name in btns_vici.__all__
    for name in btns_vici.__all__:
        assert hasattr(btns_vici, name), name


def test_accept_registry_holds_only_live_sockets(monkeypatch):
    """10,000 connections accepted (with the listener's pToken) and closed: the registry stays small."""
    monkeypatch.setattr(api, "resolve_backend", lambda backend=None, options=None: None)
    monkeypatch.setattr(api, "_verify_or_abort", lambda sock, demand, be: demand)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    addr = srv.getsockname()
    api._attached[socket_key(srv)] = PToken()
    before = len(api._attached)
    peak = 0
    kept = []
    try:
        for i in range(10_000):
            cli = socket.create_connection(addr)
            conn, _ = api.accept(srv, latch_=False)
            assert api.attached_ptoken(conn) is not None
            if i % 2000 == 0:
                kept.append((cli, conn))  # a few stay open: their entries must survive sweeps
            else:
                conn.close()
                cli.close()
            peak = max(peak, len(api._attached))
        api._attached.sweep()
        assert peak < before + 2 * api._Registry.floor + 2 * len(kept) + 4, peak
        assert api.attached_ptoken(srv) is not None
        for _cli, conn in kept:
            assert api.attached_ptoken(conn) is not None
        assert len(api._attached) <= before + len(kept)
    finally:
        for pair in kept:
            for s in pair:
                s.close()
        api._attached.pop(socket_key(srv), None)
        srv.close()
