"""Subscriptions to the kernel's XFRM multicast groups (acquire, expire, SA and policy changes).

A plain AF_NETLINK socket joined to the groups; :mod:`btns_vici.xfrm._wire` decodes what arrives.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator

from .. import netns as _netns
from . import _wire as wire
from ._records import XfrmEvent, XfrmPolicy, XfrmState
from ._wire import XfrmDecodeWarning

log = logging.getLogger("btns_vici.xfrm")

#: Multicast groups (``XFRMNLGRP_*``) by name.
GROUPS = {"acquire": 1, "expire": 2, "sa": 3, "policy": 4, "aevents": 5, "report": 6, "migrate": 7, "mapping": 8}
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
NETLINK_XFRM = 6  # linux/netlink.h


class XfrmMonitor:
    """A subscription to XFRM multicast groups; iterate it for :class:`XfrmEvent`/records.

    New/updated SAs and policies arrive as :class:`XfrmState`/:class:`XfrmPolicy`, everything
    else (acquire, expire, delete, flush) as :class:`XfrmEvent`. Use as a context manager.
    """

    def __init__(self, groups: Iterable[str] = ("acquire", "expire", "sa", "policy"), netns: str | None = None):
        with _netns.entered(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        self._sock.bind((0, 0))
        for g in groups:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, GROUPS[g])

    def fileno(self) -> int:
        return self._sock.fileno()

    def _receive(self, timeout: float | None) -> list[XfrmState | XfrmPolicy | XfrmEvent] | None:
        """The decoded notifications of one datagram; None when none arrived within ``timeout``."""
        if not select.select([self._sock], [], [], timeout)[0]:
            return None
        try:
            data = self._sock.recv(1 << 20)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            warnings.warn("XFRM notifications were lost (socket overrun)", XfrmDecodeWarning, stacklevel=3)
            return []
        decoded = (wire.decode_message(m) for m in wire.split_messages(data))
        return [r for r in decoded if r is not None]

    def poll(self, timeout: float | None = 0.0) -> list[XfrmState | XfrmPolicy | XfrmEvent]:
        """The notifications of the next datagram, waiting up to ``timeout`` seconds ([] if none)."""
        return self._receive(timeout) or []

    def events(self, timeout: float | None = None) -> Iterator[XfrmState | XfrmPolicy | XfrmEvent]:
        """Notifications as they come; stops after ``timeout`` seconds without any (never if None)."""
        while (batch := self._receive(timeout)) is not None:
            yield from batch

    __iter__ = events

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> XfrmMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(
    callback: Callable[[XfrmState | XfrmPolicy | XfrmEvent], object],
    groups: Iterable[str] = ("acquire", "expire", "sa", "policy"),
    netns: str | None = None,
) -> Callable[[], None]:
    """Call ``callback`` for each notification from a daemon thread; returns a function that stops it.

    The subscription is in place when ``watch`` returns. A callback that raises is logged, not fatal.
    """
    mon, stop = XfrmMonitor(groups, netns), threading.Event()

    def run() -> None:
        with mon:
            while not stop.is_set():
                for item in mon.poll(0.1):
                    try:
                        callback(item)
                    except Exception:
                        log.exception("XFRM watch callback failed")

    thread = threading.Thread(target=run, name="btns-xfrm-watch", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join()

    return stop_watching
