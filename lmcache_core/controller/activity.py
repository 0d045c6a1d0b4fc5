"""Rolling request and lookup rates of the controller, for the web page's charts.

``/lookup`` adds to four integers (``note_lookup``, a few hundred nanoseconds); requests per
route are already counted by the latency histogram every request passes (``ApiGuard``). Once a
second ``sample`` records the running totals, keeping ``WINDOW_SECONDS`` of them; ``series``
turns them into per-interval counts. Nothing here runs per request beyond ``note_lookup``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple

from prometheus_client import Histogram

#: how far back the page's charts reach
WINDOW_SECONDS = 300
#: the span of the per-route request totals the summary reports
ROUTE_SPAN_SECONDS = 60


class _Sample(NamedTuple):
    time: float
    lookups: int
    hits: int
    tokens: int
    matched: int
    requests: int  # running total, every route
    routes: dict[str, int]  # running total per route


class Activity:
    """Running totals of lookups (with hits and tokens) and of requests, sampled over a window."""

    def __init__(self, request_latency: Histogram, window: int = WINDOW_SECONDS) -> None:
        self.lookups = 0
        #: lookups that some instance matched (a non-empty answer)
        self.hits = 0
        #: tokens asked about, and tokens of the longest prefix found (summed over lookups)
        self.tokens = 0
        self.matched = 0
        self._histogram = request_latency
        self._samples: deque[_Sample] = deque(maxlen=window + 1)

    def note_lookup(self, n_tokens: int, layout: dict[str, list[Any]]) -> None:
        """Count one answered lookup (called on the ``/lookup`` path: keep it this small)."""
        self.lookups += 1
        self.tokens += n_tokens
        if layout:
            self.hits += 1
            self.matched += next(iter(layout.values()))[1]  # the answer lists the longest match first

    def sample(self, now: float | None = None) -> None:
        """Record the running totals (once a second)."""
        now = time.time() if now is None else now
        routes = self._requests()
        self._samples.append(_Sample(now, self.lookups, self.hits, self.tokens, self.matched, sum(routes.values()), routes))

    def _requests(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for metric in self._histogram.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    totals[sample.labels["route"]] = int(sample.value)
        return totals

    def series(self) -> dict[str, Any]:
        """Per interval between samples (oldest first): its end time, length in seconds, and the
        lookups, hits, tokens, matched tokens and requests within it; plus requests per route
        over the last ``ROUTE_SPAN_SECONDS``."""
        samples = list(self._samples)
        pairs = list(zip(samples, samples[1:]))
        out: dict[str, Any] = {
            "time": [round(after.time, 3) for _, after in pairs],
            "seconds": [round(after.time - before.time, 3) for before, after in pairs],
        }
        for field in ("lookups", "hits", "tokens", "matched", "requests"):
            column = [getattr(s, field) for s in samples]
            out[field] = [b - a for a, b in zip(column, column[1:])]
        routes: dict[str, int] = {}
        span = 0.0
        if pairs:
            last = samples[-1]
            first = next(s for s in samples if last.time - s.time <= ROUTE_SPAN_SECONDS)
            span = last.time - first.time
            for route, total in last.routes.items():
                if total > first.routes.get(route, 0):
                    routes[route] = total - first.routes.get(route, 0)
        out["routes"] = dict(sorted(routes.items(), key=lambda item: -item[1]))
        out["route_span_seconds"] = round(span, 3)
        return out
