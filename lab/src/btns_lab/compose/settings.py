"""The compose testbed's names, addresses, paths and the demo's exit codes (docker/docker-compose.yml)."""

from __future__ import annotations

import os

PROJECT = os.environ.get("BTNS_COMPOSE_PROJECT", "btns-cmp")
CACHE = os.environ.get("BTNS_COMPOSE_CACHE", "/var/cache/btns-compose")
PEERS = {"alice": "172.31.250.10", "bob": "172.31.250.11"}
SERVER, CLIENT = "bob", "alice"
PORT = 7777
MESSAGE = b"hello over IPsec"
#: In the containers: the library's host key directory, and the key exchange on the shared volume.
KEY_DIR = "/var/lib/btns-vici"
EXCHANGE = "/shared/btns-demo"
ENGINES = ("podman", "docker")
#: Exit codes besides 0 (every check passed) and 1 (a check or the connection failed).
CANNOT_RUN = 2  # not root, no TUN, no checkout, no usable engine, bad option
TESTBED_DOWN = 3  # the compose testbed could not be brought up (build, start, charons)
DATAPLANES = ("xfrm", "libipsec")


class DemoError(Exception):
    """The demo cannot run or failed; the message says why."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
