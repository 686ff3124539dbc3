"""After fork(): the child starts fresh instead of sharing the parent's daemon connections.

A forked child inherits every descriptor: the VICI sessions and event streams, the netlink
monitors, btnsd's connection. Used from both processes they would interleave requests and
steal each other's notifications; and the threads that fed the SA index and the latches do
not exist in the child. So each module that holds such state registers a reset here, run in
the child (``os.register_at_fork``): it forgets that state (closing only the child's copies of
the descriptors) and replaces its locks, which another thread may have held at the fork. The
next call in the child opens what it needs again. Tokens and sockets are untouched.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_resets: list[Callable[[], None]] = []


def in_child(reset: Callable[[], None]) -> Callable[[], None]:
    """Register ``reset`` to run in a forked child (decorator)."""
    _resets.append(reset)
    return reset


def _after_fork_in_child() -> None:
    for reset in _resets:
        try:
            reset()
        except Exception:  # a reset must never break the child
            pass


def keep_only(*fds: int) -> None:
    """In a forked helper process: close every inherited descriptor but ``fds`` (0-2 point to
    /dev/null). A helper that kept the parent's copies would hold the parent's pipes and sockets
    open: a peer waiting for their EOF (a pipe's reader, a connection's other end) would wait for
    the helper too (found: the stdin pipe of a process the parent started)."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if std not in fds:
            os.dup2(null, std)
    lo = 3
    for fd in sorted(f for f in fds if f >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)  # close_range(2): one call whatever the limit


def close_quietly(*socks: object) -> None:
    for s in socks:
        close = getattr(s, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                pass


class PerNamespace(Generic[T]):
    """One lazily made ``T`` per network namespace name (None: ours), thread-safe.

    ``forget(name)`` closes and drops one; in a forked child every one is dropped (its
    descriptors closed: they are the child's copies) and made anew on next use.
    """

    def __init__(self, factory: Callable[[str | None], T], close: Callable[[T], None]) -> None:
        self._factory, self._close = factory, close
        self._items: dict[str | None, T] = {}
        self._lock = threading.Lock()
        in_child(self._reset)

    def get(self, name: str | None) -> T:
        item = self._items.get(name)
        if item is None:
            with self._lock:
                item = self._items.get(name)
                if item is None:
                    item = self._items[name] = self._factory(name)
        return item

    def forget(self, name: str | None) -> None:
        with self._lock:
            item = self._items.pop(name, None)
        if item is not None:
            self._close(item)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _reset(self) -> None:
        items = list(self._items.values())
        self._items.clear()
        self._lock = threading.Lock()
        for item in items:
            try:
                self._close(item)
            except OSError:
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
