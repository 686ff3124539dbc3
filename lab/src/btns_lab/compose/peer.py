"""One end of the compose demo, inside its container: ``python -m btns_lab.compose.peer server|client``.

Prints JSON lines (events, then its verified tokens or an error) that :mod:`.driver` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from btns_vici.api import accept, connect, get_socket_ptoken, listen, set_socket_ptoken
from btns_vici.hostkey import load_or_create
from btns_vici.plugins import get_backend

from ..demo import btns_demand
from .settings import EXCHANGE, KEY_DIR, MESSAGE, PEERS, PORT, DemoError
from .tokens_json import ptoken_to_json

#: What the server sends once it has reported its tokens (the client waits for it before closing).
REPORTED = b"."


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _emit_tokens(role: str, name: str, host_key: bytes, sock: socket.socket, received: bytes, be: Any) -> None:
    """One end's verified tokens, as the host side reads them."""
    _emit(
        event="tokens",
        role=role,
        name=name,
        host_key=host_key.hex(),
        socket=list(sock.getsockname()[:2]),
        received=received.decode(errors="replace"),
        ptoken=ptoken_to_json(get_socket_ptoken(sock, be)),
    )


def _publish(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no .pem suffix: never read as a key
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _await(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not appear at {path} within {timeout:.0f} s")
        time.sleep(0.05)


def peer_main(role: str, name: str, peer: str, timeout: float) -> int:
    """One end inside its container; prints JSON lines (events, then its tokens or an error)."""
    try:
        host = load_or_create(KEY_DIR)
        exchange = Path(EXCHANGE)
        mine, theirs = exchange / name, exchange / peer
        mine.mkdir(parents=True, exist_ok=True)
        _publish(mine / f"{name}.pem", host.public_pem)
        _await(theirs / f"{peer}.pem", timeout, f"{peer}'s public key")
        be = get_backend("strongswan", {"key_dir": KEY_DIR, "peer_keys": str(theirs)})
        _emit(event="keys", host_key=host.public_der.hex(), key_dir=KEY_DIR, peer_keys=str(theirs))
        addr, peer_addr = PEERS[name], PEERS[peer]
        if role == "server":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
                srv.settimeout(timeout)
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                set_socket_ptoken(srv, btns_demand(), be)
                srv.bind((addr, PORT))
                listen(srv, 1, be)
                _publish(mine / "listening", b"")
                _emit(event="listening", address=[addr, PORT])
                conn, _ = accept(srv, be, latch_=False)
                with conn:
                    conn.settimeout(timeout)
                    received = conn.recv(64)
                    conn.sendall(received[::-1])
                    _emit_tokens(role, name, host.public_der, conn, received, be)
                    # Reported: now the client may close. Its process then unloads what it loaded
                    # (the library's lifecycle), which takes the SA down: not before this end's report.
                    conn.sendall(REPORTED)
                    conn.recv(1)  # until the client closes
        else:
            _await(theirs / "listening", timeout, f"{peer}'s listening socket")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as cli:
                cli.settimeout(timeout)
                set_socket_ptoken(cli, btns_demand(), be)
                connect(cli, (peer_addr, PORT), be, latch_=False)
                cli.sendall(MESSAGE)
                echo = _recv_exactly(cli, len(MESSAGE))
                _emit_tokens(role, name, host.public_der, cli, echo, be)
                if _recv_exactly(cli, len(REPORTED)) != REPORTED:  # the server has reported its end
                    raise DemoError("the server closed before reporting its tokens")
    except (OSError, DemoError) as exc:
        _emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m btns_lab.compose.peer")
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--name", required=True, choices=sorted(PEERS))
    p.add_argument("--peer", required=True, choices=sorted(PEERS))
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    sys.exit(peer_main(a.role, a.name, a.peer, a.timeout))


if __name__ == "__main__":
    main()
