"""A server socket with a demanded pToken, accepting in the background (api.listen/accept)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import btns_vici
from btns_vici.api import accept, listen
from btns_vici.core.tokens import PToken


def serve_with(srv: socket.socket, demand: PToken, backend: Any, address: tuple[str, int]) -> list:
    """set_socket_pToken, bind, listen on ``srv``; one accept() in a thread. Returns where its result lands."""
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    btns_vici.set_socket_ptoken(srv, demand, backend)
    srv.bind(address)
    listen(srv, 4, backend)
    got: list = []

    def run() -> None:
        try:
            got.append(accept(srv, backend))
        except OSError as exc:
            got.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return got


def wait_accept(got: list, timeout: float = 10.0) -> Any:
    """The (conn, addr) the background accept() returned; its exception re-raised."""
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, "the server did not accept"
    if isinstance(got[0], Exception):
        raise got[0]
    return got[0]
