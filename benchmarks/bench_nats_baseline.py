"""Raw nats-py over a real local nats-server: the ceiling lmcache's message bus works under.

Two measures, each on two client connections (like a worker and the controller):

* publish/subscribe rate: one connection publishes ``messages`` payloads of ``payload_size``
  bytes, the other counts them in a subscription callback; the rate is messages delivered per
  second, start of publishing to last delivery. The publisher stays at most ``window_bytes``
  ahead of the subscriber so neither nats-py's queue nor the server's slow-consumer limit drops
  anything (both share one event loop, as a controller's ingest would);
* request/reply round trip: sequential requests answered at once by the other connection;
  p50/p90/p99 in microseconds.

Other benchmarks import ``measure_pubsub_rate`` and ``measure_request_rtt`` (or their
``*_async`` forms inside an event loop) as their in-run baseline. Run:
``.venv/bin/python benchmarks/bench_nats_baseline.py [--url nats://host:port] [--help]``
(without ``--url`` it starts its own nats-server on a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import nats
from nats.aio.msg import Msg

MIB = 1024**2
_SUB_PENDING_BYTES = 1024 * MIB  # never the limit: the window keeps far less in flight


@dataclass(frozen=True)
class PubSubResult:
    """Messages delivered from one connection to another, and how long that took."""

    messages: int
    payload_size: int
    seconds: float

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Payload megabytes (1e6 bytes) delivered per second."""
        return self.messages * self.payload_size / self.seconds / 1e6


@dataclass(frozen=True)
class RttResult:
    """Request/reply round-trip times in microseconds."""

    samples: int
    p50_us: float
    p90_us: float
    p99_us: float


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def measure_pubsub_rate_async(
    url: str,
    *,
    messages: int = 200_000,
    payload_size: int = 64,
    window_bytes: int = 16 * MIB,
    subject: str = "bench.baseline.pubsub",
) -> PubSubResult:
    """Publish/subscribe delivery rate of raw nats-py between two connections to ``url``."""
    publisher = await nats.connect(url)
    subscriber = await nats.connect(url)
    try:
        received = 0
        progress = asyncio.Event()
        done = asyncio.Event()

        async def count(_msg: Msg) -> None:
            nonlocal received
            received += 1
            progress.set()
            if received == messages:
                done.set()

        await subscriber.subscribe(
            subject, cb=count, pending_msgs_limit=-1, pending_bytes_limit=_SUB_PENDING_BYTES
        )
        await subscriber.flush()
        payload = b"x" * payload_size
        window = max(1, window_bytes // max(1, payload_size))

        start = time.perf_counter()
        for sent in range(messages):
            while sent - received >= window:
                progress.clear()
                await publisher.flush()
                await progress.wait()
            await publisher.publish(subject, payload)
        await publisher.flush()
        await done.wait()
        seconds = time.perf_counter() - start
    finally:
        await subscriber.close()
        await publisher.close()
    return PubSubResult(messages, payload_size, seconds)


async def measure_request_rtt_async(
    url: str,
    *,
    requests: int = 5_000,
    payload_size: int = 64,
    warmup: int = 200,
    subject: str = "bench.baseline.rtt",
) -> RttResult:
    """Round-trip times of sequential raw nats-py requests answered by another connection."""
    requester = await nats.connect(url)
    responder = await nats.connect(url)
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe(subject, cb=answer)
        await responder.flush()
        payload = b"x" * payload_size
        for _ in range(warmup):
            await requester.request(subject, payload, timeout=5)
        times: list[float] = []
        for _ in range(requests):
            start = time.perf_counter()
            await requester.request(subject, payload, timeout=5)
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        await requester.close()
        await responder.close()
    times.sort()
    return RttResult(
        requests, _percentile(times, 0.5), _percentile(times, 0.9), _percentile(times, 0.99)
    )


def measure_pubsub_rate(url: str, **options: object) -> PubSubResult:
    """``measure_pubsub_rate_async`` for code without a running event loop."""
    return asyncio.run(measure_pubsub_rate_async(url, **options))  # type: ignore[arg-type]


def measure_request_rtt(url: str, **options: object) -> RttResult:
    """``measure_request_rtt_async`` for code without a running event loop."""
    return asyncio.run(measure_request_rtt_async(url, **options))  # type: ignore[arg-type]


def main() -> None:
    from _report import print_table

    from lmcache_transport_nats import NatsServerProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing nats-server (default: start one)")
    parser.add_argument("--small", type=int, default=200_000, help="64-byte messages to send")
    parser.add_argument("--large", type=int, default=20_000, help="32 KiB messages to send")
    parser.add_argument("--requests", type=int, default=5_000, help="request/reply samples")
    args = parser.parse_args()

    server = None if args.url else NatsServerProcess().start()
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        small = measure_pubsub_rate(url, messages=args.small, payload_size=64)
        large = measure_pubsub_rate(url, messages=args.large, payload_size=32 * 1024)
        rtt = measure_request_rtt(url, requests=args.requests)
    finally:
        if server is not None:
            server.stop()

    print_table(
        f"raw nats-py baseline on {url}",
        [
            ("pub/sub 64 B", f"{small.messages_per_s:,.0f} msg/s", f"{small.messages:,} messages"),
            (
                "pub/sub 32 KiB",
                f"{large.messages_per_s:,.0f} msg/s",
                f"{large.mb_per_s:,.0f} MB/s, {large.messages:,} messages",
            ),
            ("request/reply p50", f"{rtt.p50_us:,.0f} us", f"{rtt.samples:,} sequential requests"),
            ("request/reply p90", f"{rtt.p90_us:,.0f} us", ""),
            ("request/reply p99", f"{rtt.p99_us:,.0f} us", ""),
        ],
    )


if __name__ == "__main__":
    main()
