"""Prometheus metrics of one controller, in a registry of its own (never the global one).

Counters and the latency histogram are updated as things happen; gauges that describe the
index (workers, chunks per location) are computed when ``/metrics`` is scraped, so the hot
paths pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: seconds; HTTP requests of the controller are sub-millisecond to seconds (commands)
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _IndexCollector(Collector):
    """Gauges read from the controller's state at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._snapshot()
        workers = GaugeMetricFamily("lmcache_controller_workers", "Registered, live workers.")
        workers.add_metric([], snap["workers"])
        yield workers
        instances = GaugeMetricFamily("lmcache_controller_instances", "Instances with a live worker.")
        instances.add_metric([], snap["instances"])
        yield instances
        chunks = GaugeMetricFamily(
            "lmcache_controller_indexed_chunks", "Chunks indexed, per location.", labels=["location"]
        )
        tokens = GaugeMetricFamily(
            "lmcache_controller_indexed_tokens", "Tokens indexed, per location.", labels=["location"]
        )
        for location, (n_chunks, n_tokens) in sorted(snap["locations"].items()):
            chunks.add_metric([location], n_chunks)
            tokens.add_metric([location], n_tokens)
        yield chunks
        yield tokens
        entries = GaugeMetricFamily("lmcache_controller_index_entries", "(chunk, holder) entries.")
        entries.add_metric([], snap["entries"])
        yield entries


class ControllerMetrics:
    """Every metric of one controller."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(f"lmcache_controller_{name}", documentation, labels, registry=r)

        self.events_applied = counter("events_applied", "KV events applied to the index.")
        self.batches_ignored = counter(
            "batches_ignored",
            "Event batches ignored (stale, duplicate, unknown worker, more held than kept).",
            "reason",
        )
        self.identity_refused = counter(
            "identity_refused", "Messages refused because the ids inside differ from those their topic names.", "kind"
        )
        self.seq_gaps = counter("sequence_gaps", "Event-batch sequence gaps detected.")
        self.resyncs = counter(
            "resyncs", "Full resyncs of one worker's location asked for (registrations' own not counted)."
        )
        self.replays = counter("replays", "Replays of a missing batch range asked of one worker.")
        self.inventories_pulled = counter(
            "inventories_pulled", "Worker locations whose inventory this controller pulled (paced recovery).", "outcome"
        )
        self.inventory_pages = counter("inventory_pages", "Inventory pages received (replies to 'inventory').")
        self.batches_held = counter("batches_held", "Batches that arrived ahead of a missing one and waited.")
        self.late_batches_applied = counter(
            "late_batches_applied", "Held batches applied in order once what came before them arrived."
        )
        self.registrations = counter("registrations", "Worker registrations accepted.")
        self.workers_expired = counter("workers_expired", "Workers dropped after missing heartbeats.")
        self.workers_left = counter("workers_left", "Workers removed on their goodbye (a clean stop).")
        self.worker_removal_seconds = Histogram(
            "lmcache_controller_worker_removal_seconds",
            "Time to remove a dead worker's entries from the index.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "lmcache_controller_request_seconds",
            "HTTP request latency, per route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Report gauges from ``snapshot()`` (keys: workers, instances, locations, entries)."""
        self.registry.register(_IndexCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
