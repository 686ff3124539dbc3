"""btnsd's answer cache: a protected socket's encoded answer, kept until an SA or a route changes.

The socket is read on every request (its view: flow, namespace, device, mark, uid, ...: the
socket-exact truth cannot be cached, a process may change its mark at any time); what is
cached is the answer for that exact view. An entry is valid while

* the backend's SA index applied no event and listed nothing since (its ``generation``, after
  the same non-blocking drain of charon's events every answer starts with), and
* the routing of the data plane's namespace did not change (the entry lives in the
  routing view's ``memo``, which the next non-blocking drain of the route monitor drops).

Only positive answers (a Protection on kernel-libipsec) are cached: a negative one is
confirmed with a barrier round trip to charon on every query (:meth:`.index.SAIndex.find`),
and kernel XFRM proofs have their own snapshot. Backends other than the built-in strongSwan
one (with its event-fed index) are never cached: :meth:`stamp` says None.
"""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..core.records import LIBIPSEC, SocketView
from ..rtnl import routing

#: Prefix of our entries in the routing view's memo (which the data-plane proofs share).
TAG = "btnsd-answer"


class AnswerCache:
    """Per backend: the strongSwan context (index and routing view), looked up once."""

    def __init__(self) -> None:
        self._ctx: dict[int, Any] = {}
        self.hits = 0
        self.misses = 0

    def _context(self, be: Backend) -> Any:
        ctx = self._ctx.get(id(be))
        if ctx is None:
            ctx = False
            if be.name == "strongswan" and be.options.get("index", "events") == "events":
                from ..plugins import get_plugin_manager

                plugin = get_plugin_manager().get_plugin("strongswan")
                got = plugin.context(be.options) if plugin is not None else None
                if got is not None and not got.index.strict:
                    ctx = got
            self._ctx[id(be)] = ctx
        return ctx

    def stamp(self, be: Backend, view: SocketView) -> tuple[Any, dict[Any, Any]] | None:
        """(key, memo) under which ``view``'s answer is valid now, or None when nothing may be cached.

        Brings the index and the routing view up to date first (two non-blocking reads), so a
        hit is as fresh as a full answer would be.
        """
        ctx = self._ctx.get(id(be))
        if ctx is None:
            ctx = self._context(be)
        if not ctx:
            return None
        if ctx.dataplane() != LIBIPSEC:
            return None
        gen = ctx.index.stamp()
        rt = routing(ctx.netns)
        rt.fresh()
        return (TAG, view, gen), rt.memo  # view.netns was matched against the backend's just before

    def get(self, be: Backend, view: SocketView) -> tuple[bytes | None, tuple[Any, dict[Any, Any]] | None]:
        """(cached body or None, the stamp to :meth:`put` a fresh answer under)."""
        st = self.stamp(be, view)
        if st is None:
            return None, None
        key, memo = st
        body = memo.get(key)
        if body is not None:
            self.hits += 1
            return body, st
        self.misses += 1
        return None, st

    @staticmethod
    def put(st: tuple[Any, dict[Any, Any]] | None, body: bytes) -> None:
        if st is None:
            return
        key, memo = st
        if len(memo) > 4096:
            memo.clear()
        memo[key] = body
