"""Network namespaces: enter one in the calling thread (setns(2)), name its files.

Python exposes ``os.setns`` only from 3.12, so this uses libc through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def netns_path(name: str) -> str:
    """``/run/netns/NAME`` for a bare name (as ``ip netns`` creates it); a path is returned unchanged."""
    return name if "/" in name else f"/run/netns/{name}"


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open on ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name`` (None: stay).

    Sockets created inside keep that namespace after the thread switches back.
    """
    if not name:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name), os.O_RDONLY)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)
