"""The controller's HTTP path: lookup latency and throughput at scale, dead-worker removal, clear.

A controller process (``--serve``, started by this script, run as ``lmcache_controller`` runs
it) gets 100 instances registered through the protocol (synthetic workers, each holding a
prefix of one 8,192-token prompt, sent as event batches) plus bulk entries fed straight into
its index up to 10M, and a 101st worker holding 1M chunks. This process is the HTTP client.

* lookup of the 8,192-token prompt over HTTP: p50 sequential, and lookups/s with 16 concurrent
  keep-alive clients; baseline: a trivial endpoint mounted on the same server through the
  ``lmcache_controller_routes`` hook, measured the same way in the same run;
* the 1M-chunk worker stops heartbeating: time the index takes to drop it (the controller's
  own histogram) and how long after its deadline lookups stop crediting it;
* clearing 1M tokens from ``LocalCPUBackend`` of a real instance process
  (``examples/instance.py``), seen from the HTTP client; baseline: raw NATS request/reply RTT.

    .venv/bin/python benchmarks/bench_controller.py [--entries 10000000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import print_table, verdict  # noqa: E402

PROMPT_TOKENS = 8192
CHUNK = 256
INSTANCES = 100
HEARTBEAT_TIMEOUT = 5.0
DYING = "dying-instance"
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def prompt() -> list[int]:
    return np.random.default_rng(7).integers(0, 128_000, size=PROMPT_TOKENS).tolist()


# --- the controller process ----------------------------------------------------------------------


async def serve(nats_url: str, entries: int, dying_chunks: int) -> None:
    from fastapi import APIRouter

    from lmcache_core.config import load_settings
    from lmcache_core.controller.server import running_controller
    from lmcache_core.controller.synthetic import SyntheticWorker
    from lmcache_core.hookspecs import hookimpl
    from lmcache_core.keys import TokenHasher
    from lmcache_core.plugins import get_plugin_manager, resolve_transport

    state: dict[str, Any] = {"alive": True, "last_beat": 0.0}

    class BenchRoutes:
        @hookimpl
        def lmcache_controller_routes(self) -> list[APIRouter]:
            router = APIRouter(prefix="/bench")

            @router.post("/noop")
            async def noop() -> dict[str, bool]:
                """The baseline: a trivial endpoint on the same server and middleware."""
                return {"ok": True}

            @router.post("/stop_dying_worker")
            async def stop_dying() -> dict[str, float]:
                state["alive"] = False
                return {"last_heartbeat_monotonic": state["last_beat"], "timeout": HEARTBEAT_TIMEOUT}

            return [router]

    pm = get_plugin_manager(extra_plugins=[BenchRoutes()])
    settings = load_settings(
        pm, config_file=None, controller_heartbeat_timeout=HEARTBEAT_TIMEOUT, controller_command_timeout=30.0,
    )
    async with running_controller(settings, nats_url=nats_url, pm=pm) as handle:
        controller = handle.controller
        index = controller.index
        bus = await resolve_transport(pm, settings.transport).connect(settings, nats_url)
        hashes = np.array(TokenHasher(CHUNK).hashes(prompt()), dtype=np.uint64)
        fleet = [SyntheticWorker(bus, f"inst-{i:03d}", locations=(CPU, DISK), chunk_size=CHUNK) for i in range(INSTANCES)]
        dying = SyntheticWorker(bus, DYING, locations=(CPU,), chunk_size=CHUNK)
        registered: list[SyntheticWorker] = []

        async def beat() -> None:
            """Heartbeats of every registered synthetic worker (the dying one until told to stop)."""
            while True:
                for worker in list(registered):
                    if worker is not dying:
                        await worker.heartbeat()
                    elif state["alive"]:
                        await worker.heartbeat()
                        state["last_beat"] = time.monotonic()
                await anyio.sleep(0.5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            for n, worker in enumerate(fleet):
                await worker.register()
                registered.append(worker)
                held = 1 + n % len(hashes)  # prefixes of every length
                await worker.publish(worker.batch(CPU, hashes[:held], reset=True))
                await worker.publish(worker.batch(DISK, hashes[: held // 2], reset=True))
            await dying.register()
            registered.append(dying)
            rng = np.random.default_rng(3)
            # the dying worker's 1M chunks go through the protocol, 4096 admits per batch
            for start in range(0, dying_chunks, 4096):
                n = min(4096, dying_chunks - start)
                chunk = rng.integers(1, 2**63, size=n, dtype=np.uint64)
                if start == 0:
                    chunk[: len(hashes)] = hashes  # it holds the whole prompt too
                await dying.publish(dying.batch(CPU, chunk, reset=(start == 0)))
                if start % (64 * 4096) == 0:
                    await bus.flush()
            await bus.flush()
            with anyio.fail_after(120):  # until every batch of the dying worker is applied
                while True:
                    state_now = controller.workers.get((DYING, 0))
                    if state_now is not None and state_now.locations[CPU].applied_seq == dying.seq[CPU]:
                        break
                    await anyio.sleep(0.01)
            # bulk: random chunks spread over the fleet's holders, fed to the index directly
            holders = [loc.holder for w in controller.workers.values() if w.instance_id != DYING
                       for loc in w.locations.values()]
            step = 1_000_000
            while index.num_entries() < entries:
                n = min(step, entries - index.num_entries())
                per = max(1, n // len(holders))
                for holder in holders:
                    index.admit(holder, rng.integers(1, 2**63, size=per, dtype=np.uint64), np.full(per, CHUNK, np.uint32))
                    await anyio.sleep(0)  # let heartbeats through
            print(json.dumps({"ready": True, "port": handle.port, "entries": index.num_entries(),
                              "memory_bytes": index.memory_bytes()}), flush=True)
            await anyio.sleep_forever()


# --- the client (this process) ---------------------------------------------------------------------


def sequential_latency(port: int, path: str, body: bytes, n: int, warmup: int = 100) -> tuple[float, float, dict]:
    """p50 and p99 in ms of ``n`` sequential keep-alive POSTs; also the last response."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    times = []
    last: dict = {}
    for i in range(warmup + n):
        start = time.perf_counter()
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {data[:300]!r}")
        if i >= warmup:
            times.append(elapsed)
    last = json.loads(data)
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3, last


async def concurrent_rate(port: int, path: str, body: bytes, clients: int, seconds: float) -> float:
    """Requests/s of ``clients`` keep-alive connections posting ``body`` back to back."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"{path} answered {head[:100]!r}")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - start)


def post(port: int, path: str, body: Any) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def read_ready(proc: subprocess.Popen, what: str, timeout: float = 300) -> dict:
    from lmcache_core.controller.cli import read_ready_line

    return read_ready_line(proc, what, timeout)


def run(args: argparse.Namespace) -> None:
    from bench_nats_baseline import measure_request_rtt

    from lmcache_core.testing import running_nats_server

    rows: list[tuple[str, str, str]] = []
    with running_nats_server() as nats_server:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", nats_server.url, "--entries", str(args.entries),
             "--dying-chunks", str(args.dying_chunks)],
            stdout=subprocess.PIPE, text=True,
        )
        instance = None
        try:
            ready = read_ready(server, "the controller")
            port = ready["port"]
            body = json.dumps({"tokens": prompt()}).encode()
            p50, p99, last = sequential_latency(port, "/lookup", body, args.requests)
            credited = len(last["layout_info"])
            base_p50, base_p99, _ = sequential_latency(port, "/bench/noop", body, args.requests)
            rate = asyncio.run(concurrent_rate(port, "/lookup", body, 16, args.seconds))
            base_rate = asyncio.run(concurrent_rate(port, "/bench/noop", body, 16, args.seconds))
            rows += [
                (f"index entries / bytes per entry", f"{ready['entries']:,}", f"{ready['memory_bytes'] / ready['entries']:.1f} B/entry"),
                ("lookup 8,192 tokens over HTTP, p50 (ms)", f"{p50:.3f}", f"p99 {p99:.3f}; {credited} instances credited; target <= 1.5: {verdict(p50 <= 1.5)}"),
                ("  baseline: trivial endpoint, p50 (ms)", f"{base_p50:.3f}", f"p99 {base_p99:.3f}; lookup/baseline {p50 / base_p50:.2f}x"),
                ("lookups/s, 16 concurrent clients", f"{rate:,.0f}", f"target >= 1,000: {verdict(rate >= 1000)}"),
                ("  baseline: trivial endpoint req/s", f"{base_rate:,.0f}", f"lookup/baseline {rate / base_rate:.2f}"),
            ]

            # the 1M-chunk worker goes silent
            status, info = post(port, "/bench/stop_dying_worker", {})
            expiry = info["last_heartbeat_monotonic"] + info["timeout"]
            query = {"tokens": prompt()[:CHUNK], "instance_id": DYING}
            while True:
                status, data = post(port, "/lookup", query)
                if not data["layout_info"]:
                    gone = time.monotonic()
                    break
                if time.monotonic() > expiry + 30:
                    raise SystemExit("the dead worker was never removed")
            removal_s = metric(port, "lmcache_controller_worker_removal_seconds_sum")
            removed = metric(port, "lmcache_controller_worker_removal_seconds_count")
            rows += [
                (f"dead worker ({args.dying_chunks:,} chunks) removal (ms)", f"{removal_s / max(removed, 1) * 1e3:.2f}",
                 f"target <= 100: {verdict(removal_s / max(removed, 1) <= 0.1)}"),
                ("  lookups stop crediting it, after its deadline (ms)", f"{(gone - expiry) * 1e3:.0f}",
                 f"heartbeat timeout {HEARTBEAT_TIMEOUT:g} s; check period {min(HEARTBEAT_TIMEOUT / 10, 0.5) * 1e3:.0f} ms"),
            ]

            # clear 1M tokens held by a real instance in LocalCPUBackend
            chunks = -(-args.clear_tokens // CHUNK)
            env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_") or k.endswith("PLUGINS")}
            env.update(
                LMCACHE_ENABLE_CONTROLLER="true", LMCACHE_CONTROLLER_URL=nats_server.url,
                LMCACHE_LMCACHE_INSTANCE_ID="clear-me", LMCACHE_CHUNK_SIZE=str(CHUNK),
                LMCACHE_MAX_LOCAL_CPU_SIZE="0.5", LMCACHE_WORKER_HEARTBEAT_INTERVAL="0.5",
            )
            instance = subprocess.Popen(
                [sys.executable, str(HERE.parent / "examples" / "instance.py"), "--store-random", str(chunks),
                 "--num-layers", "1", "--hidden", "8", "--ready-timeout", "120"],
                stdout=subprocess.PIPE, text=True, env=env,
            )
            read_ready(instance, "the instance")
            deadline = time.monotonic() + 60
            while True:  # until the index holds every chunk it stored
                _, data = post(port, "/query_worker_info", {"instance_id": "clear-me"})
                held = data["worker_infos"][0]["locations"][CPU]["tokens"] if "worker_infos" in data else 0
                if held >= chunks * CHUNK:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the index never held the instance's {chunks * CHUNK} tokens ({held})")
            start = time.perf_counter()
            status, cleared = post(port, "/clear", {"instance_id": "clear-me", "location": CPU})
            clear_ms = (time.perf_counter() - start) * 1e3
            if status != 200:
                raise SystemExit(f"/clear answered {status}: {cleared}")
            rtt = measure_request_rtt(nats_server.url, requests=1000)
            rows += [
                (f"clear {cleared['num_tokens']:,} tokens from {CPU}, over HTTP (ms)", f"{clear_ms:.1f}",
                 f"target <= 100: {verdict(clear_ms <= 100)}"),
                ("  baseline: raw NATS request/reply RTT p50 (ms)", f"{rtt.p50_us / 1e3:.3f}", f"clear/RTT {clear_ms / (rtt.p50_us / 1e3):.0f}x"),
            ]
        finally:
            for proc in (instance, server):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    print_table(f"Controller over HTTP ({INSTANCES} instances, 8,192-token prompt, chunk size {CHUNK})", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000_000, help="index entries in total")
    parser.add_argument("--dying-chunks", type=int, default=1_000_000)
    parser.add_argument("--clear-tokens", type=int, default=1_048_576)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per p50")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each concurrent run")
    parser.add_argument("--serve", metavar="NATS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        try:
            import uvloop  # noqa: F401

            options = {"use_uvloop": True}
        except ImportError:
            options = {}
        anyio.run(serve, args.serve, args.entries, args.dying_chunks, backend_options=options)
    else:
        run(args)


if __name__ == "__main__":
    main()
