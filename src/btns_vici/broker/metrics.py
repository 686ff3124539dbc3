"""btnsd's metrics: Prometheus (prometheus_client) in the main process, a tally in each worker.

The main process's registry counts every query. A worker (``--workers``) cannot write to it: it
keeps a :class:`Tally` with the same recording interface (plain counters, the histogram's own
buckets) and sends it to the main process about every second over its channel
(:mod:`.workers`), where :meth:`Metrics.merge` adds it in. So a scrape lags a worker's answers by
at most about a second; nothing is counted twice or lost while the worker lives (a killed worker's
last second is lost with it).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter as Tallied
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backend import Backend

#: btnsd_request_seconds's buckets (both sides; the histogram appends +Inf)
BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1, 10)
_BOUNDS = (*BUCKETS, math.inf)


class Metrics:
    """Prometheus metrics when prometheus_client is installed and --metrics given; no-ops otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = False
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queries = Counter(
            "btnsd_queries_total", "Requests by op and answer", ["op", "answer"], registry=self.registry
        )
        self.latency = Histogram(
            "btnsd_request_seconds", "Request latency", ["op"], registry=self.registry, buckets=BUCKETS
        )
        self.clients = Gauge("btnsd_clients", "Connected clients", registry=self.registry)
        self.errors = Counter(
            "btnsd_broker_errors_total", "Malformed or refused client input", ["kind"], registry=self.registry
        )
        self.latch_breaks = Counter(
            "btnsd_latch_breaks_total", "Latched connections whose protection broke", registry=self.registry
        )
        self.sas = Gauge(
            "btnsd_sas", "Installed CHILD_SAs the backend's index holds", ["backend"], registry=self.registry
        )
        self.workers = Gauge("btnsd_workers", "Worker processes reading clients", registry=self.registry)
        self.enabled = True

    def serve(self, where: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = where.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)

    def query(self, op: str, answer: str, seconds: float) -> None:
        if self.enabled:
            self.queries.labels(op, answer).inc()
            self.latency.labels(op).observe(seconds)

    def error(self, kind: str) -> None:
        if self.enabled:
            self.errors.labels(kind).inc()

    def latch_break(self) -> None:
        if self.enabled:
            self.latch_breaks.inc()

    def merge(self, tally: Any) -> None:
        """Add a worker's :meth:`Tally.snapshot` (validated: a malformed one is ignored, never raised)."""
        if not self.enabled or not isinstance(tally, dict):
            return
        try:
            for op, answer, n in tally.get("q", []):
                self.queries.labels(str(op), str(answer)).inc(int(n))
            for kind, n in tally.get("e", []):
                self.errors.labels(str(kind)).inc(int(n))
            for op, counts, total in tally.get("h", []):
                h = self.latency.labels(str(op))
                if len(counts) != len(_BOUNDS):
                    continue
                # The histogram's own cells (prometheus_client has no public "add n to a bucket"):
                # the same buckets on both sides, so the merged histogram is exact.
                h._sum.inc(float(total))
                for cell, n in zip(h._buckets, counts, strict=True):
                    if n:
                        cell.inc(int(n))
        except (TypeError, ValueError, AttributeError):
            return

    def sas_of(self, backends: list[Backend]) -> None:
        """Set btnsd_sas per backend (label: name@netns) from the indexes (no daemon call)."""
        if not self.enabled:
            return
        from ..plugins import get_plugin_manager

        for be in backends:
            plugin = get_plugin_manager().get_plugin(be.name)
            index = (
                getattr(plugin.context(be.options), "index", None)
                if plugin is not None and hasattr(plugin, "context")
                else None
            )
            if index is not None:
                n = sum(len(kids) for kids in index.child_ids().values())
                self.sas.labels(f"{be.name}@{be.options.get('netns') or 'own netns'}").set(n)


class Tally:
    """A worker's counts since the last :meth:`clear`: :class:`Metrics`'s recording interface."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._queries: Tallied[tuple[str, str]] = Tallied()
        self._errors: Tallied[str] = Tallied()
        self._hist: dict[str, tuple[list[int], list[float]]] = {}

    def query(self, op: str, answer: str, seconds: float) -> None:
        if not self.enabled:
            return
        self._queries[op, answer] += 1
        h = self._hist.get(op)
        if h is None:
            h = self._hist[op] = ([0] * len(_BOUNDS), [0.0])
        h[0][bisect.bisect_left(_BOUNDS, seconds)] += 1
        h[1][0] += seconds

    def error(self, kind: str) -> None:
        if self.enabled:
            self._errors[kind] += 1

    def latch_break(self) -> None:  # pragma: no cover - latches live in the main process
        pass

    def snapshot(self) -> dict[str, Any] | None:
        """What was counted since the last :meth:`clear` (None: nothing), as JSON-able lists."""
        if not (self._queries or self._errors):
            return None
        return {
            "q": [[op, answer, n] for (op, answer), n in self._queries.items()],
            "e": [[kind, n] for kind, n in self._errors.items()],
            "h": [[op, counts, total[0]] for op, (counts, total) in self._hist.items()],
        }

    def clear(self) -> None:
        self._queries.clear()
        self._errors.clear()
        self._hist.clear()
