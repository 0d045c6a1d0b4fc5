"""Event ingest end to end: workers publish ``EventBatch``es over NATS, the controller applies them.

A publisher process (``--publish``, started by this script) registers synthetic workers with
the controller through the protocol and publishes pre-built batches of chunk admits (4096 per
batch, the worker's default batch size), staying at most a window of batches ahead of what the
controller has applied (like a real fleet, it must not overrun the broker's slow-consumer
limit). The controller runs in this process, exactly as ``lmcache_controller`` runs it. The
rate is chunk admits applied to the index per second, first publish to last apply.

Baseline, measured in the same run on the same nats-server: raw nats-py publish/subscribe
messages per second with the same payload size (``bench_nats_baseline.py``), also expressed as
admits/s if every message carried a batch that cost nothing to apply.

    .venv/bin/python benchmarks/bench_ingest.py [--workers 4] [--batches 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_table, verdict  # noqa: E402
from bench_nats_baseline import measure_pubsub_rate_async  # noqa: E402

from lmcache_core.config import load_settings  # noqa: E402
from lmcache_core.controller.server import running_controller  # noqa: E402
from lmcache_core.controller.synthetic import SyntheticWorker  # noqa: E402
from lmcache_core.plugins import get_plugin_manager, resolve_transport  # noqa: E402
from lmcache_core.transport import Message  # noqa: E402
from lmcache_core.wire import events_topic  # noqa: E402

APPLIED_TOPIC = "bench.ingest.applied"
LOCATION = "LocalCPUBackend"
TARGET_ADMITS_PER_S = 1_000_000


async def publish(url: str, workers: int, batches: int, batch_size: int, window: int) -> None:
    """The publisher process: register, pre-build every batch, publish on 'go' with flow control."""
    pm = get_plugin_manager()
    settings = load_settings(pm, config_file=None)
    bus = await resolve_transport(pm, settings.transport).connect(settings, url)
    fleet = [SyntheticWorker(bus, f"ingest-{i}", locations=(LOCATION,)) for i in range(workers)]
    for worker in fleet:
        ack = await worker.register()
        assert ack.accepted, ack.detail
    rng = np.random.default_rng(1)
    payloads: list[tuple[str, bytes]] = []
    for k in range(batches):
        for worker in fleet:
            hashes = rng.integers(1, 2**63, size=batch_size, dtype=np.uint64)
            batch = worker.batch(LOCATION, hashes, reset=(k == 0))  # the first answers the registration's resync
            payloads.append((events_topic(worker.ident.instance_id, worker.ident.worker_id), batch.encode()))
    print(json.dumps({"ready": True, "payload_bytes": len(payloads[0][1])}), flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    started = time.perf_counter()
    for sent, (topic, payload) in enumerate(payloads, start=1):
        await bus.publish(topic, payload)
        if sent % (window // 2) == 0:
            # flow control: wait until the controller is at most `window` batches behind
            while True:
                applied = int(await bus.request(APPLIED_TOPIC, b"", 10.0))
                if sent * batch_size - applied <= window * batch_size:
                    break
    await bus.flush()
    print(json.dumps({"published_s": time.perf_counter() - started}), flush=True)
    await bus.aclose()


async def run(args: argparse.Namespace) -> None:
    from lmcache_core.testing import running_nats_server

    total = args.workers * args.batches * args.batch_size
    pm = get_plugin_manager()
    settings = load_settings(pm, config_file=None, controller_heartbeat_timeout=600.0)
    with running_nats_server() as server:
        async with running_controller(settings, nats_url=server.url, pm=pm) as handle:
            index = handle.controller.index
            bus = await resolve_transport(pm, settings.transport).connect(settings, server.url)

            async def applied(msg: Message) -> None:
                await msg.respond(str(index.num_entries()).encode())

            await bus.subscribe(APPLIED_TOPIC, applied)
            cmd = [sys.executable, __file__, "--publish", server.url, "--workers", str(args.workers),
                   "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--window", str(args.window)]
            async with await anyio.open_process(cmd, stderr=None) as proc:
                assert proc.stdout is not None and proc.stdin is not None
                lines = proc.stdout
                ready = json.loads(await _readline(lines))
                await proc.stdin.send(b"go\n")
                started = time.perf_counter()
                with anyio.fail_after(120):
                    while index.num_entries() < total:
                        await anyio.sleep(0.002)  # poll interval of a bounded wait
                seconds = time.perf_counter() - started
                await _readline(lines)
                await proc.wait()
            await bus.aclose()
        rate = total / seconds
        baseline = await measure_pubsub_rate_async(
            server.url, messages=args.workers * args.batches, payload_size=ready["payload_bytes"]
        )
    raw_admits = baseline.messages_per_s * args.batch_size
    print_table(
        f"Event ingest over NATS: {total:,} chunk admits in batches of {args.batch_size} "
        f"({ready['payload_bytes']:,} B each), {args.workers} workers",
        [
            ("controller ingest (admits applied/s)", f"{rate:,.0f}", f"target >= {TARGET_ADMITS_PER_S:,}: {verdict(rate >= TARGET_ADMITS_PER_S)}"),
            ("controller ingest (batches/s)", f"{rate / args.batch_size:,.0f}", ""),
            ("raw NATS pub/sub, same payload (msgs/s)", f"{baseline.messages_per_s:,.0f}", f"{baseline.mb_per_s:,.0f} MB/s"),
            ("raw NATS as admits/s (x batch size)", f"{raw_admits:,.0f}", "ceiling: delivery alone, nothing applied"),
            ("ingest / raw NATS ceiling", f"{rate / raw_admits:.2f}x", ""),
        ],
    )


async def _readline(stream) -> str:
    data = b""
    with anyio.fail_after(120):
        while not data.endswith(b"\n"):
            chunk = await stream.receive(1)
            data += chunk
    return data.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=256, help="batches per worker")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--window", type=int, default=64, help="most batches in flight")
    parser.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        anyio.run(publish, args.publish, args.workers, args.batches, args.batch_size, args.window)
    else:
        anyio.run(run, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
