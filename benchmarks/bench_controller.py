"""The controller's HTTP path: lookup latency and throughput at scale, dead-worker removal, clear.

A controller process (``--serve``, started by this script, run as ``lmcache_controller`` runs
it) gets 100 instances registered through the protocol (synthetic workers, each holding a
prefix of one 8,192-token prompt, sent as event batches) plus bulk entries fed straight into
its index up to 10M, and a 101st worker holding 1M chunks. This process is the HTTP client.

* lookup of the 8,192-token prompt over HTTP: p50/p90/p99 sequential, and lookups/s with 16
  concurrent keep-alive clients (raw sockets on uvloop, after a warm-up); baseline: a trivial
  endpoint mounted on the same server through the ``lmcache_controller_routes`` hook, measured
  the same way in interleaved rounds (``--rounds``; best-of and median printed, the box being
  shared). The server's CPU ms per request (its ``time.process_time()`` deltas) is printed too,
  so the figures can be judged apart from the client and neighbours sharing the cores;
* the 1M-chunk worker stops heartbeating: time the index takes to drop it (the controller's
  own histogram) and how long after its deadline lookups stop crediting it;
* clearing 1M tokens from ``LocalCPUBackend`` of a real instance process
  (``examples/instance.py``), seen from the HTTP client; baseline: raw NATS request/reply RTT.

    .venv/bin/python benchmarks/bench_controller.py [--entries 10000000] [--lookup-only]
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

            @router.get("/cpu")
            async def cpu() -> dict[str, float]:
                """CPU seconds this server process has used: the client takes deltas around a run,
                so the server's cost per lookup can be judged apart from the shared cores."""
                return {"cpu": time.process_time()}

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


def server_cpu(port: int) -> float:
    """The server process's CPU seconds so far."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/bench/cpu")
    value = json.loads(conn.getresponse().read())["cpu"]
    conn.close()
    return value


def sequential_latency(port: int, path: str, body: bytes, n: int, warmup: int = 200) -> dict[str, Any]:
    """p50/p90/p99 in ms of ``n`` sequential keep-alive POSTs, the server's CPU ms per request,
    and the last response."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    times = []
    for i in range(warmup + n):
        if i == warmup:
            cpu_before = server_cpu(port)
        start = time.perf_counter()
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {data[:300]!r}")
        if i >= warmup:
            times.append(elapsed)
    cpu_ms = (server_cpu(port) - cpu_before) / n * 1e3
    conn.close()
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(len(times) * q))] * 1e3  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "cpu_ms": cpu_ms, "last": json.loads(data)}


async def read_answer(reader: asyncio.StreamReader, path: str) -> bytes:
    """The body of one HTTP/1.1 answer with a Content-Length; exits unless it is a 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{path} answered {head[:100]!r}")
    at = head.lower().index(b"content-length: ") + 16
    return await reader.readexactly(int(head[at : head.index(b"\r", at)]))


async def concurrent_rate(port: int, path: str, body: bytes, clients: int, seconds: float) -> tuple[float, float]:
    """(requests/s, server CPU ms per request) of ``clients`` keep-alive connections posting
    ``body`` back to back; raw sockets keep the client's own cost (it shares the cores) low."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    done = 0
    started = asyncio.Event()
    deadline = 0.0

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await started.wait()
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                await read_answer(reader, path)
                done += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    await asyncio.sleep(0)
    cpu_before = server_cpu(port)
    start = time.perf_counter()
    deadline = start + seconds
    started.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return done / elapsed, (server_cpu(port) - cpu_before) / max(done, 1) * 1e3


def run_async(coro: Any) -> Any:
    """``asyncio.run`` on uvloop when installed: a cheaper client leaves more CPU to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def lookup_rows(port: int, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Lookup latency and throughput against the trivial endpoint, ``args.rounds`` interleaved
    rounds (the box is shared: best-of and median are both printed)."""
    body = json.dumps({"tokens": prompt()}).encode()
    for path in ("/lookup", "/bench/noop"):  # warm both paths (and the 16 connections' setup)
        run_async(concurrent_rate(port, path, body, 16, 0.5))
    seq: dict[str, list[dict[str, Any]]] = {"/lookup": [], "/bench/noop": []}
    conc: dict[str, list[tuple[float, float]]] = {"/lookup": [], "/bench/noop": []}
    for _ in range(args.rounds):
        for path in seq:
            seq[path].append(sequential_latency(port, path, body, args.requests))
            conc[path].append(run_async(concurrent_rate(port, path, body, 16, args.seconds)))
    credited = len(seq["/lookup"][-1]["last"]["layout_info"])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731

    def latency(path: str) -> tuple[float, float, str]:
        runs = seq[path]
        best = min(runs, key=lambda r: r["p50"])
        return best["p50"], med([r["p50"] for r in runs]), (
            f"p90 {best['p90']:.3f}, p99 {best['p99']:.3f} (best round); median p50 {med([r['p50'] for r in runs]):.3f};"
            f" server CPU {min(r['cpu_ms'] for r in runs):.3f} ms/request"
        )

    p50, _, lookup_note = latency("/lookup")
    base_p50, _, base_note = latency("/bench/noop")
    rate = max(r for r, _ in conc["/lookup"])
    base_rate = max(r for r, _ in conc["/bench/noop"])
    cpu = min(c for _, c in conc["/lookup"])
    base_cpu = min(c for _, c in conc["/bench/noop"])
    return [
        (f"lookup 8,192 tokens over HTTP, p50 (ms), best of {args.rounds}", f"{p50:.3f}",
         f"{lookup_note}; {credited} instances credited; target <= 1.5: {verdict(p50 <= 1.5)}"),
        ("  baseline: trivial endpoint, p50 (ms)", f"{base_p50:.3f}", f"{base_note}; lookup/baseline {p50 / base_p50:.2f}x"),
        (f"lookups/s, 16 concurrent clients, best of {args.rounds}", f"{rate:,.0f}",
         f"median {med([r for r, _ in conc['/lookup']]):,.0f}; server CPU {cpu:.3f} ms/lookup"
         f" (-> {1e3 / cpu:,.0f}/s on one free core); target >= 1,000: {verdict(rate >= 1000)}"),
        ("  baseline: trivial endpoint req/s", f"{base_rate:,.0f}",
         f"median {med([r for r, _ in conc['/bench/noop']]):,.0f}; server CPU {base_cpu:.3f} ms/request;"
         f" lookup/baseline {rate / base_rate:.2f}"),
    ]


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
            rows += [
                ("index entries / bytes per entry", f"{ready['entries']:,}", f"{ready['memory_bytes'] / ready['entries']:.1f} B/entry"),
                *lookup_rows(port, args),
            ]
            if args.lookup_only:
                print_table(f"Controller over HTTP ({INSTANCES} instances, 8,192-token prompt, chunk size {CHUNK})", rows)
                return

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
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per p50 and round")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each concurrent run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of lookup and baseline runs")
    parser.add_argument("--lookup-only", action="store_true", help="skip the dead-worker and clear measurements")
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
