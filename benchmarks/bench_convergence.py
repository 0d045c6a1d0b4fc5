"""Convergence at fleet scale: a controller restart, stale workers, and bus traffic.

A fleet process (``--fleet``, started by this script) runs ``--workers`` synthetic workers on
one NATS connection, each holding ``--chunks`` chunks at one location. They speak the worker's
side of the protocol with the real wire models (``lmcache_core.wire``): register on a hello
(to everyone, or to their own run), answer ``inventory`` commands page by page from a snapshot
(the controller pulls what it lacks, a bounded window of workers at a time), send their
inventory as reset batches when an ack or a ``resync`` command asks, answer ``replay`` with
``not_retained`` (they retain nothing, so a real gap costs that one worker a resync), and
heartbeat every ``worker_heartbeat_interval``. The
controller runs in this process, exactly as ``lmcache_controller`` runs it, against a real
nats-server whose monitoring endpoint (``/varz``) counts every message on the bus.

Measured:

* (a) a controller restart: from the new controller's start until its index equals what the
  fleet holds (every worker registered, every holder with ``--chunks`` entries); target 10 s;
* (b) stale workers, one at a time, on the converged fleet: one whose batch was lost (it
  announces it in a heartbeat), and one the controller dropped (its heartbeats are from a run
  the controller does not know). Each must cost 0 fleet-wide hellos and no registration or
  inventory from any other worker;
* (c) bus messages per second (server in + out) at steady state and during the recovery;
* (d) a second controller joining the converged one: how long until its index equals the
  fleet, how many inventories the workers sent (one each, to the new controller alone) and
  what the first controller applied again meanwhile (target: nothing).

Baseline, measured in the same run on the same nats-server: raw nats-py publish/subscribe
rate with the payload sizes of an inventory batch and of a heartbeat (``bench_nats_baseline.py``).

    .venv/bin/python benchmarks/bench_convergence.py [--workers 1000] [--chunks 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_table, verdict  # noqa: E402
from bench_nats_baseline import measure_pubsub_rate_async  # noqa: E402

from lmcache_core.config import load_settings  # noqa: E402
from lmcache_core.controller.server import running_controller  # noqa: E402
from lmcache_core.events import EventKind  # noqa: E402
from lmcache_core.inventory import InventorySnapshots  # noqa: E402
from lmcache_core.keys import HASH_SCHEME  # noqa: E402
from lmcache_core.plugins import get_plugin_manager, resolve_transport  # noqa: E402
from lmcache_core.testing import free_port  # noqa: E402
from lmcache_core.transport import Message, MessageBus  # noqa: E402
from lmcache_core.wire import (  # noqa: E402
    HELLO_TOPIC,
    CommandReply,
    CommandRequest,
    EventBatch,
    HashingParams,
    Heartbeat,
    Hello,
    InventoryCommand,
    PingCommand,
    RegistrationAck,
    ReplayCommand,
    ResyncCommand,
    WorkerIdentity,
    WorkerRegistration,
    events_topic,
    heartbeat_topic,
    register_topic,
)

LOCATION = "LocalCPUBackend"
TARGET_CONVERGE_S = 10.0
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def inventory(index: int, chunks: int) -> np.ndarray:
    """Worker ``index``'s chunk hashes: distinct across the fleet, spread over 64 bits."""
    base = np.arange(index * chunks + 1, (index + 1) * chunks + 1, dtype=np.uint64)
    return base * GOLDEN  # odd multiplier: a bijection on uint64, so still distinct


class FleetWorker:
    """One synthetic worker rank: its identity, sequence number and inventory."""

    def __init__(self, fleet: "Fleet", index: int, chunks: int) -> None:
        self.fleet = fleet
        self.index = index
        self.ident = WorkerIdentity(instance_id=f"w{index:05d}", worker_id=0, epoch=uuid.uuid4().hex)
        self.registration = WorkerRegistration(
            **self.ident.model_dump(exclude={"version"}),
            model_name="synthetic-model", kv_dtype="bfloat16",
            hashing=HashingParams(scheme=HASH_SCHEME, chunk_size=256),
            locations=[LOCATION], host="synthetic", started_at=time.time(),
        )
        self.hashes = inventory(index, chunks)
        self.snapshots = InventorySnapshots()
        self.seq = 0
        self.lock = anyio.Lock()  # one resync at a time, batches in seq order

    async def register(self) -> None:
        bus = self.fleet.bus
        self.fleet.registrations[self.index] += 1
        for attempt in range(10):
            try:
                raw = await bus.request(register_topic(self.ident.instance_id, 0), self.registration.encode(), 10.0)
                break
            except Exception:  # noqa: BLE001 - a busy controller: retry with backoff, as a worker does
                await anyio.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            return
        ack = RegistrationAck.decode(raw)
        if ack.accepted and ack.resync:
            await self.resync()

    async def resync(self) -> int:
        """Send the whole inventory as reset batches; the seq of the last one."""
        async with self.lock:
            topic = events_topic(self.ident.instance_id, 0)
            size = self.fleet.batch_size
            for start in range(0, len(self.hashes), size):
                part = self.hashes[start:start + size]
                self.seq += 1
                batch = EventBatch.build(
                    self.ident, LOCATION, self.seq, np.full(len(part), int(EventKind.ADMIT), np.uint8),
                    part, np.full(len(part), 256, np.uint32), reset=(start == 0),
                )
                await self.fleet.bus.publish(topic, batch.encode())
                self.fleet.inventories[self.index] += start == 0
            return self.seq

    def inventory(self, command: InventoryCommand) -> CommandReply:
        """One page of a snapshot of the inventory (the first request takes it)."""
        fleet = self.fleet
        snapshot_id = None
        if command.snapshot is None:
            snapshot_id = self.snapshots.take(LOCATION, self.seq, self.hashes, np.full(len(self.hashes), 256, np.uint32))
            fleet.inventories[self.index] += 1
        return self.reply(ok=True, location=LOCATION, inventory=self.snapshots.page(command, snapshot_id))

    async def lose_a_batch(self) -> None:
        """Admit one more chunk in a batch that never reaches the bus, then heartbeat."""
        async with self.lock:
            self.hashes = np.append(self.hashes, np.uint64(2**64 - 1 - self.index))
            self.seq += 1
        await self.heartbeat()

    async def heartbeat(self) -> None:
        beat = Heartbeat(**self.ident.model_dump(exclude={"version"}), last_seq={LOCATION: self.seq},
                         chunks={LOCATION: len(self.hashes)})
        await self.fleet.bus.publish(heartbeat_topic(self.ident.instance_id, 0), beat.encode())

    def reply(self, **fields: Any) -> CommandReply:
        return CommandReply(instance_id=self.ident.instance_id, worker_id=0, epoch=self.ident.epoch, **fields)


class Fleet:
    """The fleet process: every worker on one bus, driven by lines on stdin."""

    def __init__(self, bus: MessageBus, workers: int, chunks: int, batch_size: int, interval: float) -> None:
        self.bus = bus
        self.batch_size = batch_size
        self.interval = interval
        self.workers = [FleetWorker(self, i, chunks) for i in range(workers)]
        self.by_instance = {w.ident.instance_id: w for w in self.workers}
        self.registrations = [0] * workers
        self.inventories = [0] * workers  # sent: pushed as reset batches, or a snapshot pulled
        self.hellos_all = 0
        self.hellos_one = 0
        self.command_seconds = 0.0  # spent answering commands (the fleet answers one at a time)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg

            async def on_hello(msg: Message) -> None:
                hello = Hello.decode(msg.payload)
                if msg.topic == HELLO_TOPIC:
                    self.hellos_all += 1
                    for worker in self.workers:
                        tg.start_soon(worker.register)
                    return
                self.hellos_one += 1
                worker = self.by_instance.get(msg.topic.split(".")[2])
                if worker is not None and hello.epoch == worker.ident.epoch:
                    tg.start_soon(worker.register)

            async def on_command(msg: Message) -> None:
                t0 = time.perf_counter()
                try:
                    await answer(msg)
                finally:
                    self.command_seconds += time.perf_counter() - t0

            async def answer(msg: Message) -> None:
                request = CommandRequest.decode(msg.payload)
                worker = self.by_instance[msg.topic.split(".")[1]]
                command = request.command
                if isinstance(command, InventoryCommand):
                    reply = worker.inventory(command)
                elif isinstance(command, ResyncCommand):
                    reply = worker.reply(ok=True, last_seq={LOCATION: await worker.resync()})
                elif isinstance(command, ReplayCommand):
                    reply = worker.reply(ok=False, error_kind="not_retained", error="retains nothing")
                elif isinstance(command, PingCommand):
                    reply = worker.reply(ok=True)
                else:
                    reply = worker.reply(ok=False, error_kind="bad_request", error=f"unsupported {command.op}")
                await msg.respond(reply.encode())

            await self.bus.subscribe(HELLO_TOPIC, on_hello)
            await self.bus.subscribe(f"{HELLO_TOPIC}.*.*", on_hello)
            await self.bus.subscribe("cmd.*.*", on_command)
            tg.start_soon(self.heartbeats)
            print(json.dumps({"ready": True}), flush=True)  # the controller's hello registers us
            await self.control()
            tg.cancel_scope.cancel()

    async def heartbeats(self) -> None:
        """Every worker once per interval, spread over it in ten slices."""
        slices = 10
        while True:
            for k in range(slices):
                for worker in self.workers[k::slices]:
                    await worker.heartbeat()
                await anyio.sleep(self.interval / slices)

    async def control(self) -> None:
        """Answer the driver: 'counts', 'lose W', 'quit'."""
        while True:
            line = (await anyio.to_thread.run_sync(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            if line[0] == "lose":
                await self.workers[int(line[1])].lose_a_batch()
            out = {
                "hellos_all": self.hellos_all, "hellos_one": self.hellos_one,
                "registrations": self.registrations, "inventories": self.inventories,
                "command_seconds": self.command_seconds,
                "chunks": [len(w.hashes) for w in self.workers],
            }
            print(json.dumps(out), flush=True)


async def fleet_main(args: argparse.Namespace) -> None:
    pm = get_plugin_manager()
    settings = load_settings(pm, config_file=None)
    bus = await resolve_transport(pm, settings.transport).connect(settings, args.fleet)
    try:
        await Fleet(bus, args.workers, args.chunks, args.batch_size, settings.worker_heartbeat_interval).run()
    finally:
        await bus.aclose()


# --- the driver ---------------------------------------------------------------------------------


class FleetProcess:
    """The fleet subprocess, spoken to one line at a time."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.buffer = b""

    async def ask(self, line: str) -> dict:
        await self.proc.stdin.send(line.encode() + b"\n")
        return await self.read()

    async def read(self) -> dict:
        with anyio.fail_after(120):
            while b"\n" not in self.buffer:
                self.buffer += await self.proc.stdout.receive()
        head, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(head)


def varz(monitor: int) -> dict:
    """The server's counters (``/varz``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
        return json.load(resp)


def bus_messages(monitor: int) -> int:
    """Messages the server received plus delivered, so far."""
    counters = varz(monitor)
    return int(counters["in_msgs"]) + int(counters["out_msgs"])


async def messages_now(monitor: int) -> int:
    return await anyio.to_thread.run_sync(bus_messages, monitor)


def converged(controller: Any, expected: list[int]) -> bool:
    """The index holds exactly each worker's inventory (counts per holder, and the total)."""
    if len(controller.workers) != len(expected) or controller.index.num_entries() != sum(expected):
        return False
    for (instance_id, _rank), worker in controller.workers.items():
        loc = worker.locations[LOCATION]
        if loc.awaiting_reset or controller.index.holder_stats(loc.holder)[0] != expected[int(instance_id[1:])]:
            return False
    return True


async def wait_converged(controller: Any, expected: list[int], timeout: float) -> float:
    """Seconds until the index equals the fleet; ``inf`` when it did not within ``timeout``."""
    started = time.perf_counter()
    with anyio.move_on_after(timeout):
        while not converged(controller, expected):
            await anyio.sleep(0.01)  # poll interval of a bounded wait
        return time.perf_counter() - started
    return float("inf")


def not_converged(name: str, controller: Any, expected: list[int], monitor: int, timeout: float) -> None:
    """Say what the index held when it did not converge, and how the server coped."""
    counters = varz(monitor)
    print_table(f"Convergence: {len(expected):,} synthetic workers x {expected[0]:,} chunks over a real nats-server", [
        (f"{name}: index equals the fleet", "no", f"{verdict(False)}: not within {timeout:g} s"),
        ("    entries indexed / held by the fleet", f"{controller.index.num_entries():,} / {sum(expected):,}", ""),
        ("    workers registered", f"{len(controller.workers):,} / {len(expected):,}", ""),
        ("    nats-server slow consumers (clients cut off)", f"{counters.get('slow_consumers', 0)}",
         "the server's max_pending for one client is 64 MiB by default"),
    ])


def resyncs(controller: Any) -> int:
    return int(controller.metrics.resyncs._value.get())


def applied(controller: Any) -> int:
    """Events the controller applied from batches so far."""
    return int(controller.metrics.events_applied._value.get())


def installed(controller: Any) -> int:
    """Inventory snapshots the controller installed so far."""
    return int(controller.metrics.inventories_pulled.labels("installed")._value.get())


async def stale_case(name: str, fleet: FleetProcess, handle: Any, monitor: int, act: Any, stale: int,
                     expected: list[int]) -> dict:
    """Run ``act`` on the converged fleet; what it cost until the index matched again."""
    controller = handle.controller
    before, resyncs_before, msgs_before = await fleet.ask("counts"), resyncs(controller), await messages_now(monitor)
    started = time.perf_counter()
    after_act = await act()
    if after_act is not None:
        expected = after_act
    # the controller first waits out the gap's grace period: poll until it matched again
    seconds = await wait_converged(controller, expected, 60)  # a gap first waits out its grace (1 s)
    await anyio.sleep(1.5)  # a further heartbeat round: nothing else may follow
    after = await fleet.ask("counts")
    others = [i for i in range(len(expected)) if i != stale]
    return {
        "name": name,
        "seconds": seconds,
        "hellos_all": after["hellos_all"] - before["hellos_all"],
        "hellos_one": after["hellos_one"] - before["hellos_one"],
        "others_registered": sum(after["registrations"][i] - before["registrations"][i] for i in others),
        "others_resent": sum(after["inventories"][i] - before["inventories"][i] for i in others),
        "resyncs": resyncs(controller) - resyncs_before,
        "msgs_per_s": (await messages_now(monitor) - msgs_before) / (time.perf_counter() - started),
        "ok": converged(controller, expected),
        "expected": expected,
    }


async def run(args: argparse.Namespace) -> None:
    from lmcache_core.testing import running_nats_server

    pm = get_plugin_manager()
    settings = load_settings(pm, config_file=None)
    monitor = free_port()
    expected = [args.chunks] * args.workers
    total = args.workers * args.chunks
    with running_nats_server(args=["-m", str(monitor)]) as server:
        cmd = [sys.executable, __file__, "--fleet", server.url, "--workers", str(args.workers),
               "--chunks", str(args.chunks), "--batch-size", str(args.batch_size)]
        async with await anyio.open_process(cmd, stderr=None) as proc:
            fleet = FleetProcess(proc)
            await fleet.read()  # subscribed: the first controller's hello reaches every worker
            # first start: the fleet registers as it comes up; wait until it is all in
            async with running_controller(settings, nats_url=server.url, pm=pm) as handle:
                first = await wait_converged(handle.controller, expected, args.timeout)
                memory = handle.controller.index.memory_bytes()
                if first == float("inf"):
                    not_converged("first start", handle.controller, expected, monitor, args.timeout)
                    await proc.stdin.send(b"quit\n")
                    return
            # (a) a restart: the new controller says hello and the fleet sends everything again
            counts_before, msgs_before = await fleet.ask("counts"), await messages_now(monitor)
            slow_before = varz(monitor).get("slow_consumers", 0)
            started = time.perf_counter()
            async with running_controller(settings, nats_url=server.url, pm=pm) as handle:
                restart = await wait_converged(handle.controller, expected, args.timeout)
                recovery_rate = (await messages_now(monitor) - msgs_before) / (time.perf_counter() - started)
                if restart == float("inf"):
                    not_converged("(a) restart", handle.controller, expected, monitor, args.timeout)
                    await proc.stdin.send(b"quit\n")
                    return
                counts = await fleet.ask("counts")
                most_pulls = handle.controller.most_pulls_running
                # (c) steady state: heartbeats only
                msgs_before, t0 = await messages_now(monitor), time.perf_counter()
                await anyio.sleep(args.steady)
                steady_rate = (await messages_now(monitor) - msgs_before) / (time.perf_counter() - t0)
                # (b) stale workers, one at a time
                controller = handle.controller
                lost = 1

                async def lose() -> list[int]:
                    reply = await fleet.ask(f"lose {lost}")
                    return reply["chunks"]

                dropped = 2

                async def drop() -> None:
                    controller._forget_worker(controller.workers[(f"w{dropped:05d}", 0)])

                cases = [
                    await stale_case("a worker lost a batch (heartbeat ahead)", fleet, handle, monitor, lose, lost, expected),
                ]
                expected = cases[-1]["expected"]
                cases.append(await stale_case("the controller dropped a worker (unknown run)", fleet, handle, monitor, drop, dropped, expected))
                expected = cases[-1]["expected"]
                # (d) a second controller joins the converged one
                applied_before, installed_before = applied(controller), installed(controller)
                joined_before, msgs_before = await fleet.ask("counts"), await messages_now(monitor)
                started = time.perf_counter()
                async with running_controller(settings, nats_url=server.url, pm=pm) as second:
                    join = await wait_converged(second.controller, expected, args.timeout)
                    join_rate = (await messages_now(monitor) - msgs_before) / (time.perf_counter() - started)
                joined = await fleet.ask("counts")
                join_sent = sum(joined["inventories"]) - sum(joined_before["inventories"])
                reapplied = applied(controller) - applied_before + installed(controller) - installed_before
                first_intact = converged(controller, expected)
                slow_consumers = varz(monitor).get("slow_consumers", 0) - slow_before
            await proc.stdin.send(b"quit\n")
            await proc.wait()
        per_batch = min(args.batch_size, args.chunks)
        batch_bytes = len(EventBatch.build(
            WorkerIdentity(instance_id="w00000", worker_id=0, epoch=uuid.uuid4().hex), LOCATION, 1,
            np.ones(per_batch, np.uint8), np.arange(per_batch, dtype=np.uint64),
            np.full(per_batch, 256, np.uint32), reset=True).encode())
        beat_bytes = len(Heartbeat(instance_id="w00000", worker_id=0, epoch=uuid.uuid4().hex,
                                   last_seq={LOCATION: 3}, chunks={LOCATION: args.chunks}).encode())
        base_batch = await measure_pubsub_rate_async(server.url, messages=5_000, payload_size=batch_bytes)
        base_beat = await measure_pubsub_rate_async(server.url, messages=200_000, payload_size=beat_bytes)

    batches = args.workers * -(-args.chunks // args.batch_size)
    raw_floor = batches / base_batch.messages_per_s
    fleet_hellos = counts["hellos_all"] - counts_before["hellos_all"]
    targeted = counts["hellos_one"] - counts_before["hellos_one"]
    registered = sum(counts["registrations"]) - sum(counts_before["registrations"])
    resent = sum(counts["inventories"]) - sum(counts_before["inventories"])
    rows = [
        ("first start: fleet registered and indexed (s)", f"{first:.2f}", f"{total:,} entries, index {memory / total:.1f} B/entry"),
        ("(a) restart: index equals the fleet (s)", f"{restart:.2f}",
         f"target <= {TARGET_CONVERGE_S:g} s: {verdict(restart <= TARGET_CONVERGE_S)}; {total / restart:,.0f} entries/s"),
        ("    raw NATS: the same inventory batches alone (s)", f"{raw_floor:.2f}",
         f"{batches:,} x {batch_bytes:,} B at {base_batch.messages_per_s:,.0f} msgs/s (delivery only, floor)"),
        ("    hellos to the whole fleet / to one worker", f"{fleet_hellos} / {targeted}", "1 fleet-wide expected: the new controller's"),
        ("    registrations / inventories sent", f"{registered:,} / {resent:,}", f"{args.workers:,} workers: 1 each at best"),
        ("    fleet process busy answering inventory commands (s)", f"{counts['command_seconds'] - counts_before['command_seconds']:.2f}",
         "one process answers every worker's commands, one at a time"),
        ("    inventory pulls running at once, at most", f"{most_pulls}",
         f"controller_recovery_window {settings.controller_recovery_window} (one page each in flight)"),
        ("    nats-server slow consumers (clients cut off) since", f"{slow_consumers}", f"target 0: {verdict(slow_consumers == 0)}"),
    ]
    for case in cases:
        rows += [
            (f"(b) {case['name']}: fleet-wide hellos", f"{case['hellos_all']}", f"target 0: {verdict(case['hellos_all'] == 0)}"),
            ("    other workers that registered / resent", f"{case['others_registered']} / {case['others_resent']}",
             f"{verdict(case['others_registered'] == 0 and case['others_resent'] == 0)}"),
            ("    resyncs / targeted hellos / repaired in (s)", f"{case['resyncs']} / {case['hellos_one']} / {case['seconds']:.2f}",
             f"index equals the fleet: {verdict(case['ok'])}"),
        ]
    rows += [
        ("(c) bus msgs/s, steady state (server in + out)", f"{steady_rate:,.0f}",
         f"{args.workers:,} heartbeats/s x 2 (in, out) expected"),
        ("    raw NATS pub/sub, heartbeat size (msgs/s)", f"{base_beat.messages_per_s:,.0f}",
         f"{beat_bytes} B; steady state uses {steady_rate / 2 / base_beat.messages_per_s:.1%} of it"),
        ("(c) bus msgs/s during the restart's recovery", f"{recovery_rate:,.0f}", ""),
        ("    raw NATS pub/sub, inventory batch size (msgs/s)", f"{base_batch.messages_per_s:,.0f}",
         f"{batch_bytes:,} B, {base_batch.mb_per_s:,.0f} MB/s"),
    ]
    for case in cases:
        rows.append((f"(c) bus msgs/s while repairing: {case['name']}", f"{case['msgs_per_s']:,.0f}", ""))
    rows += [
        ("(d) a second controller joins: its index equals the fleet (s)", f"{join:.2f}",
         f"target <= {TARGET_CONVERGE_S:g} s: {verdict(join <= TARGET_CONVERGE_S)}"),
        ("    inventories the workers sent / events + snapshots the first applied again",
         f"{join_sent:,} / {reapplied:,}", f"{args.workers:,} / 0 expected (pulled by the new one alone): "
         f"{verdict(join_sent == args.workers and reapplied == 0 and first_intact)}"),
        ("(c) bus msgs/s while the second controller caught up", f"{join_rate:,.0f}", ""),
    ]
    print_table(f"Convergence: {args.workers:,} synthetic workers x {args.chunks:,} chunks over a real nats-server", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks each worker holds")
    parser.add_argument("--batch-size", type=int, default=4096, help="events per inventory batch (the worker's default)")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of steady state measured")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for convergence (s)")
    parser.add_argument("--fleet", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fleet:
        anyio.run(fleet_main, args)
    else:
        anyio.run(run, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
