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
from collections.abc import Callable

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


def close_quietly(*socks: object) -> None:
    for s in socks:
        close = getattr(s, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
