"""Paced, targeted recovery (protocol 5): a controller pulls the inventories it lacks, a bounded
window of workers at a time, as replies to its own requests.

A fleet of synthetic workers (real wire messages, one connection) on a real nats-server whose
``max_pending`` is far below the fleet's inventory: a restarted controller must converge without
the server ever cutting it off as a slow consumer; a second controller must catch up without the
first applying anything again; two runs sharing an instance id end the same way on every
controller whatever order each heard them in.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import numpy as np
import pytest

from lmcache_core.config import LMCacheSettings
from lmcache_core.controller.server import running_controller
from lmcache_core.controller.state import Controller
from lmcache_core.controller.synthetic import SyntheticWorker
from lmcache_core.plugins import get_plugin_manager, resolve_transport
from lmcache_core.testing import free_port, running_nats_server
from lmcache_core.transport import Message, MessageBus
from lmcache_core.wire import HELLO_TOPIC, Hello, hello_topic

from .support import controller_settings, metric

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

CPU = "LocalCPUBackend"
WORKERS = 60
CHUNKS = 3_000  # each: 3 pages of 1,000
WINDOW = 4
#: the server cuts a client whose unsent data passes this: the fleet's inventory is ~2.7 MB
MAX_PENDING = 1024 * 1024


def recovery_settings(**overrides: object) -> LMCacheSettings:
    return controller_settings(
        controller_heartbeat_timeout=60.0,  # the synthetic fleet heartbeats once, on registering
        controller_recovery_window=WINDOW,
        controller_inventory_page=1_000,
        controller_command_timeout=10.0,  # a loaded machine must not turn slow replies into retries
        **overrides,
    )


class Fleet:
    """Synthetic workers on one bus that register again whenever a controller says hello."""

    def __init__(self, bus: MessageBus, count: int, chunks: int) -> None:
        self.bus = bus
        self.workers = [SyntheticWorker(bus, f"w{i:03d}") for i in range(count)]
        for i, worker in enumerate(self.workers):
            hashes = np.arange(i * chunks + 1, (i + 1) * chunks + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            worker.inventory[CPU] = hashes

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        for worker in self.workers:
            await worker.serve_commands()

        async def register(worker: SyntheticWorker) -> None:
            await worker.register(30.0)
            await worker.heartbeat()  # says how many chunks it holds: the controller makes room

        async def on_hello(msg: Message) -> None:
            for worker in self.workers:
                tg.start_soon(register, worker)

        await self.bus.subscribe(HELLO_TOPIC, on_hello)
        await self.bus.flush()

    def snapshots_taken(self) -> int:
        """Inventories pulled so far (first pages: the requests that took a snapshot)."""
        return sum(1 for w in self.workers for c in w.commands if c.command.op == "inventory" and c.command.snapshot is None)

    def expected(self) -> dict[str, int]:
        return {w.ident.instance_id: len(w.inventory[CPU]) for w in self.workers}


def indexed(controller: Controller) -> dict[str, int]:
    """Chunks the index holds per instance, for locations whose base is installed."""
    out = {}
    for (instance_id, _), worker in controller.workers.items():
        loc = worker.locations[CPU]
        if not loc.awaiting_reset:
            out[instance_id] = controller.index.holder_stats(loc.holder)[0]
    return out


async def converge(controller: Controller, fleet: Fleet, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while indexed(controller) != fleet.expected():
            await anyio.sleep(0.02)  # poll interval of a deadline-bounded poll


def slow_consumers(monitor: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
        return int(json.load(resp)["slow_consumers"])


@pytest.fixture
async def tight_server(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A nats-server with a small ``max_pending`` (per client) and its monitoring port."""
    config = tmp_path / "nats.conf"
    config.write_text(f"max_pending: {MAX_PENDING}\n")
    monitor = free_port()
    with running_nats_server(args=["--config", str(config), "-m", str(monitor)]) as server:
        yield server.url, monitor


async def test_a_restarted_controller_pulls_the_fleet_paced_and_is_never_cut_off(tight_server: tuple[str, int]) -> None:
    url, monitor = tight_server
    settings = recovery_settings()
    pm = get_plugin_manager()
    async with await resolve_transport(pm, "nats").connect(settings, url) as bus, anyio.create_task_group() as tg:
        fleet = Fleet(bus, WORKERS, CHUNKS)
        await fleet.start(tg)
        async with running_controller(settings, nats_url=url, pm=pm) as first:
            await converge(first.controller, fleet)
        taken = fleet.snapshots_taken()
        assert taken == WORKERS
        async with running_controller(settings, nats_url=url, pm=pm) as restarted:
            controller = restarted.controller
            await converge(controller, fleet)
            # each worker's inventory once, in three pages, never more than the window at once
            assert fleet.snapshots_taken() - taken == WORKERS
            assert metric(controller, "inventory_pages") == WORKERS * 3
            assert metric(controller, "inventories_pulled", "installed") == WORKERS
            assert 1 <= controller.most_pulls_running <= WINDOW
            assert metric(controller, "resyncs") == 0
            assert controller.index.num_entries() == WORKERS * CHUNKS
            # the index grew to the fleet's size in a few rebuilds, not one per growth step of
            # 1.4x from empty (about 17 here): the heartbeats' counts were reserved at once
            assert controller.index.rebuilds_started <= 4, controller.index.rebuilds_started
        assert slow_consumers(monitor) == 0
        tg.cancel_scope.cancel()


async def test_a_second_controller_catches_up_alone_and_the_first_applies_nothing_again(nats_url: str) -> None:
    settings = recovery_settings()
    pm = get_plugin_manager()
    async with await resolve_transport(pm, "nats").connect(settings, nats_url) as bus, anyio.create_task_group() as tg:
        fleet = Fleet(bus, 20, 2_500)
        await fleet.start(tg)
        async with running_controller(settings, nats_url=nats_url, pm=pm) as first:
            await converge(first.controller, fleet)
            before = (
                metric(first.controller, "events_applied"),
                metric(first.controller, "inventories_pulled", "installed"),
                fleet.snapshots_taken(),
            )
            async with running_controller(settings, nats_url=nats_url, pm=pm) as second:
                await converge(second.controller, fleet)
                # every worker registered again (the hello), each sent its inventory once: to the
                # second controller, in replies to its requests
                assert fleet.snapshots_taken() - before[2] == 20
                assert metric(second.controller, "inventories_pulled", "installed") == 20
                assert metric(first.controller, "events_applied") == before[0]
                assert metric(first.controller, "inventories_pulled", "installed") == before[1]
                assert indexed(first.controller) == fleet.expected()
        tg.cancel_scope.cancel()


class HelloRecorder:
    def __init__(self) -> None:
        self.heard: list[tuple[str, Hello]] = []

    async def __call__(self, msg: Message) -> None:
        self.heard.append((msg.topic, Hello.decode(msg.payload)))


async def test_two_controllers_that_heard_a_duplicate_id_in_another_order_keep_the_same_run(nats_url: str) -> None:
    settings = recovery_settings()
    pm = get_plugin_manager()
    async with await resolve_transport(pm, "nats").connect(settings, nats_url) as bus:
        older, newer = SyntheticWorker(bus, "dup"), SyntheticWorker(bus, "dup")
        newer.registration = newer.registration.model_copy(update={"started_at": older.registration.started_at + 10})
        hellos = HelloRecorder()
        await bus.subscribe(f"{HELLO_TOPIC}.*.*", hellos)
        async with running_controller(settings, nats_url=nats_url, pm=pm) as a:
            assert (await older.register()).accepted  # only A runs: A knows the older run
            async with running_controller(settings, nats_url=nats_url, pm=pm) as b:
                await newer.register()  # A refuses it (the older runs); B knew nobody and takes it
                await until(lambda: epoch_of(b.controller) == newer.ident.epoch)
                assert epoch_of(a.controller) == older.ident.epoch
                await older.register()  # B: the older run started first, so it displaces the newer
                await until(lambda: epoch_of(b.controller) == older.ident.epoch)
                assert epoch_of(a.controller) == older.ident.epoch
                # the displaced run is told (a hello to its own epoch) and is refused from now on
                await until(lambda: (hello_topic("dup", 0), Hello(epoch=newer.ident.epoch)) in hellos.heard)
                assert not (await newer.register()).accepted
                await bus.flush()
                assert epoch_of(a.controller) == epoch_of(b.controller) == older.ident.epoch


def epoch_of(controller: Controller) -> str | None:
    worker = controller.workers.get(("dup", 0))
    return worker.epoch if worker is not None else None


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll


async def test_a_pull_that_found_nobody_is_tried_again_until_the_worker_answers(nats_url: str) -> None:
    settings = recovery_settings(controller_gap_grace=0.2)
    pm = get_plugin_manager()
    async with await resolve_transport(pm, "nats").connect(settings, nats_url) as bus:
        worker = SyntheticWorker(bus, "late")
        worker.inventory[CPU] = np.arange(1, 101, dtype=np.uint64)  # restored from disk: no batch yet
        async with running_controller(settings, nats_url=nats_url, pm=pm) as handle:
            controller = handle.controller
            assert (await worker.register()).accepted
            await until(lambda: metric(controller, "inventories_pulled", "failed") >= 1)  # nobody answers yet
            await worker.serve_commands()
            await until(lambda: indexed(controller) == {"late": 100})
            assert metric(controller, "inventories_pulled", "installed") == 1
