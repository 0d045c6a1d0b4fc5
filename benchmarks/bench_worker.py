"""Worker event throughput: KV events moved from the engine to the message bus, per second.

Over a real local nats-server, a real engine (CPU location) and its worker, with a subscriber on
a second connection counting the events it receives (decoded ``EventBatch``es):

* worker capacity: N events already queued for the worker (exactly what the engine's callback
  does) until the subscriber received all N. Target: > 1M events/s.
* end to end: the engine emits N admit events from a producer thread as fast as it can, until
  the subscriber received all N; beside the engine's own emission rate with no worker attached
  (the ceiling). A ratio near 1 means the worker keeps up with the engine.
* baseline: raw nats-py pub/sub of payloads of one full batch's size, measured in the same run
  (``bench_nats_baseline``), as events/s (messages/s x batch size).

Run: ``.venv/bin/python benchmarks/bench_worker.py [--events N]`` (about 20 s).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_table, verdict  # noqa: E402
from anyio.from_thread import start_blocking_portal  # noqa: E402
from bench_nats_baseline import measure_pubsub_rate  # noqa: E402

from lmcache_core.config import load_settings  # noqa: E402
from lmcache_core.engine import CacheEngine, EngineMetadata  # noqa: E402
from lmcache_core.events import EventBus, EventKind, KVEvent  # noqa: E402
from lmcache_core.keys import ChunkKey  # noqa: E402
from lmcache_core.plugins import get_plugin_manager, resolve_transport  # noqa: E402
from lmcache_core.testing import running_nats_server  # noqa: E402
from lmcache_core.transport import Message  # noqa: E402
from lmcache_core.wire import EVENTS_WILDCARD, EventBatch  # noqa: E402
from lmcache_core.worker import start_worker  # noqa: E402

LOCATION = "LocalCPUBackend"


class EventCounter:
    """Counts events in the batches a bus subscription receives; wakes waiters at a target."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = threading.Event()

    async def on_batch(self, msg: Message) -> None:
        batch = EventBatch.decode(msg.payload)
        if batch.reset:
            return
        self.count += len(batch.kinds)
        if self.target and self.count >= self.target:
            self.reached.set()

    def expect(self, more: int) -> None:
        self.reached.clear()
        self.target = self.count + more

    def wait(self, timeout: float) -> bool:
        return self.reached.wait(timeout)


def engine_emit_rate(n: int, keys: list[ChunkKey]) -> float:
    """Events/s the engine's event bus emits to a bare deque-append subscriber (no worker)."""
    import collections

    bus = EventBus()
    sink = collections.deque()
    bus.subscribe(sink.append)
    admitted = bus.sink(LOCATION).admitted
    mask = len(keys) - 1
    start = time.perf_counter()
    for i in range(n):
        admitted(keys[i & mask], 256)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events per measurement")
    args = parser.parse_args()
    n = args.events
    keys = [
        ChunkKey("bench-model", 1, 0, "bfloat16", (i * 0x9E3779B97F4A7C15) % 2**64)
        for i in range(4096)
    ]

    with (
        running_nats_server() as server,
        start_blocking_portal() as portal,
    ):
        pm = get_plugin_manager()
        settings = load_settings(
            pm,
            config_file=None,
            enable_controller=True,
            controller_url=server.url,
            max_local_cpu_size=0.01,
            local_disk=None,
            worker_heartbeat_interval=1.0,
        )
        batch_size = settings.worker_event_batch_size
        counter = EventCounter()
        spec = resolve_transport(pm, settings.transport)
        bus = portal.call(spec.connect, settings, server.url)
        portal.call(bus.subscribe, EVENTS_WILDCARD, counter.on_batch)
        portal.call(bus.flush)

        with CacheEngine(settings, EngineMetadata("bench-model"), pm, start_worker=False) as engine:
            worker = start_worker(engine)
            try:
                deadline = time.monotonic() + 10
                while not worker.connected and time.monotonic() < deadline:
                    worker.sync(0.5)  # returns at once when not connected; bounded by the deadline
                # 1. worker capacity: events queued exactly as the engine's callback queues them
                queued = [
                    KVEvent(EventKind.ADMIT, LOCATION, keys[i & 4095], 256, i + 1) for i in range(n)
                ]
                counter.expect(n)
                start = time.perf_counter()
                worker._pending.extend(queued)
                assert counter.wait(120), f"received {counter.count} of {n}"
                capacity = n / (time.perf_counter() - start)
                del queued

                # 2. end to end from the engine's event bus, producer in this thread
                admitted = engine.events.sink(LOCATION).admitted
                counter.expect(n)
                start = time.perf_counter()
                for i in range(n):
                    admitted(keys[i & 4095], 256)
                assert counter.wait(120), f"received {counter.count} of {n}"
                end_to_end = n / (time.perf_counter() - start)
            finally:
                worker.close()
        portal.call(bus.aclose)
        ceiling = engine_emit_rate(n, keys)

        sample = EventBatch.build(
            worker.identity,
            LOCATION,
            1,
            *(
                [EventKind.ADMIT] * batch_size,
                [k.chunk_hash for k in keys[:batch_size]],
                [256] * batch_size,
            ),
        ).encode()
        raw = measure_pubsub_rate(server.url, messages=2000, payload_size=len(sample))
        raw_events = raw.messages_per_s * batch_size

    print_table(
        f"Worker event throughput ({n:,} events, batches of {batch_size}, "
        f"{len(sample):,}-byte messages)",
        [
            (
                "worker capacity (queued -> received)",
                f"{capacity / 1e6:.2f} M/s",
                verdict(capacity > 1e6) + " (target > 1M/s)",
            ),
            (
                "baseline: raw NATS pub/sub, same size",
                f"{raw_events / 1e6:.2f} M/s",
                f"{raw.messages_per_s:,.0f} msg/s; ratio {capacity / raw_events:.2f}",
            ),
            (
                "end to end (engine emit -> received)",
                f"{end_to_end / 1e6:.2f} M/s",
                f"ratio to engine emit alone {end_to_end / ceiling:.2f}",
            ),
            (
                "engine emit alone (no worker)",
                f"{ceiling / 1e6:.2f} M/s",
                "the engine's EventBus is the ceiling here",
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
