"""Descriptors btnsd received that are not sockets, closed on a thread of their own.

Any client can send any descriptor. Closing one (or fstat'ing it) can block the caller for good:
a file of a FUSE file system whose server never answers (close sends FLUSH and waits
uninterruptibly, SIGKILL does not end it; fstat sends GETATTR). So the serving loop only
classifies what it receives (:func:`is_socket`: readlink of /proc/self/fd/N, which asks no file
system) and hands everything else here. A closer stuck on such a file costs the descriptors queued
behind it, never the loop; at most :data:`MAX_PENDING` wait, beyond that the client that sent one
more is dropped (README "btnsd: the broker", bad input). A btnsd whose closer is stuck exits once
the FUSE server goes away.
"""

from __future__ import annotations

import os
import queue
import threading

#: Descriptors that may wait for the closer before a client sending another is dropped.
MAX_PENDING = 256

_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
_lock = threading.Lock()
_pending = 0
_thread: threading.Thread | None = None


def is_socket(fd: int) -> bool:
    """``fd`` is a socket, decided without any file-system call (no FUSE request can block it)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")
    except OSError:
        return False


def bury(fds: list[int]) -> bool:
    """Close ``fds`` on the closer thread; False when more than MAX_PENDING now wait there."""
    global _pending, _thread
    with _lock:
        _pending += len(fds)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_close_forever, name="btnsd-graveyard", daemon=True)
            _thread.start()
        ok = _pending <= MAX_PENDING
    for fd in fds:
        _queue.put(fd)
    return ok


def pending() -> int:
    """Descriptors waiting to be closed (a stuck closer shows here)."""
    with _lock:
        return _pending


def _close_forever() -> None:
    global _pending
    while True:
        fd = _queue.get()
        try:
            os.close(fd)
        except OSError:
            pass
        with _lock:
            _pending -= 1
