"""The controller's side of the wire protocol, driven by synthetic workers with exact sequence numbers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
import numpy as np
import pytest

from lmcache_core.controller.server import ControllerHandle, running_controller
from lmcache_core.controller.synthetic import SyntheticWorker
from lmcache_core.events import EventKind
from lmcache_core.keys import TokenHasher
from lmcache_core.plugins import get_plugin_manager, resolve_transport
from lmcache_core.transport import Message, MessageBus
from lmcache_core.wire import HELLO_TOPIC, CommandRequest, EventBatch, Heartbeat, Hello, hello_topic

from .support import HEARTBEAT_TIMEOUT, controller_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

CPU = "LocalCPUBackend"
PROMPT = list(range(1000, 1000 + 1024))  # 4 chunks of 256
HASHES = np.array(TokenHasher(256).hashes(PROMPT), dtype=np.uint64)


@dataclass
class Rig:
    handle: ControllerHandle
    bus: MessageBus
    http: httpx.AsyncClient

    async def lookup(self) -> dict:
        response = await self.http.post("/lookup", json={"tokens": PROMPT})
        assert response.status_code == 200, response.text
        return response.json()["layout_info"]

    async def wait_lookup(self, expected: dict, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while (got := await self.lookup()) != expected:
                await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll
        assert got == expected

    async def worker(self, name: str = "syn", **kwargs) -> SyntheticWorker:
        worker = SyntheticWorker(self.bus, name, **kwargs)
        ack = await worker.register()
        assert ack.accepted and not ack.resync  # protocol 5: the controller pulls what it lacks
        return worker


async def _rig(nats_url: str, **settings) -> AsyncIterator[Rig]:
    config = controller_settings(**settings)
    pm = get_plugin_manager()
    async with running_controller(config, nats_url=nats_url, pm=pm) as handle:
        bus = await resolve_transport(pm, "nats").connect(config, nats_url)
        async with bus, httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            yield Rig(handle, bus, http)


@pytest.fixture
async def rig(nats_url: str) -> AsyncIterator[Rig]:
    async for r in _rig(nats_url):
        yield r


@pytest.fixture
async def gap_rig(nats_url: str) -> AsyncIterator[Rig]:
    """A rig whose synthetic workers stay registered without heartbeats, with a short grace."""
    async for r in _rig(nats_url, controller_heartbeat_timeout=60.0, controller_gap_grace=0.2):
        yield r


async def _requests(worker: SyntheticWorker, op: str, count: int = 1) -> list[CommandRequest]:
    with anyio.fail_after(10):
        while len([c for c in worker.commands if c.command.op == op]) < count:
            await anyio.sleep(0.01)
    return [c for c in worker.commands if c.command.op == op]


def _count(rig: Rig, metric: str) -> float:
    return getattr(rig.handle.controller.metrics, metric)._value.get()


def _replay_policy(worker: SyntheticWorker, retained: bool):
    """Answer replays as a worker that still retains the range (or no longer does)."""

    def answer(request: CommandRequest):
        if request.command.op != "replay":
            return worker.reply(num_tokens=0)
        if retained:
            return worker.reply(last_seq={CPU: request.command.last_seq})
        return worker.reply(ok=False, error_kind="not_retained", error="gone")

    return answer


async def test_batches_arriving_out_of_order_are_applied_in_order_without_any_command(gap_rig: Rig) -> None:
    rig = gap_rig
    worker = await rig.worker()
    await worker.serve_commands()
    await worker.publish(worker.batch(CPU, HASHES[:1], reset=True))  # seq 1
    second, third = worker.batch(CPU, HASHES[1:2]), worker.batch(CPU, HASHES[2:3], kind=EventKind.ADMIT)
    await worker.publish(third)  # seq 3 overtakes seq 2: held
    await worker.heartbeat()  # announcing seq 3: still only a gap within its grace period
    await worker.publish(second)
    await rig.wait_lookup({"syn": [CPU, 768]})
    assert _count(rig, "late_batches_applied") == 1
    assert [c for c in worker.commands if c.command.op != "inventory"] == []  # neither a replay nor a resync


async def test_a_gap_that_outlives_its_grace_is_replayed_and_the_held_batches_follow(gap_rig: Rig) -> None:
    rig = gap_rig
    worker = await rig.worker()
    await worker.serve_commands(_replay_policy(worker, retained=True))
    await worker.publish(worker.batch(CPU, HASHES[:2], reset=True))  # seq 1
    await rig.wait_lookup({"syn": [CPU, 512]})
    lost = worker.batch(CPU, HASHES[2:3])  # seq 2 is lost on the way
    await worker.publish(worker.batch(CPU, HASHES[3:4]))  # seq 3: held
    request = (await _requests(worker, "replay"))[0]
    assert (request.command.location, request.command.first_seq, request.command.last_seq) == (CPU, 2, 3)
    assert request.deadline is not None and request.deadline > time.time() - 60
    await worker.publish(lost)  # what the worker's replay publishes again
    await worker.publish(worker.batch(CPU, HASHES[3:4], seq=3))  # a duplicate: ignored
    await rig.wait_lookup({"syn": [CPU, 1024]})
    assert _count(rig, "replays") == 1 and _count(rig, "resyncs") == 0


async def test_a_heartbeat_announcing_batches_that_never_arrive_asks_for_their_replay(gap_rig: Rig) -> None:
    rig = gap_rig
    worker = await rig.worker()
    await worker.serve_commands(_replay_policy(worker, retained=True))
    await worker.publish(worker.batch(CPU, HASHES[:1], reset=True))
    await rig.wait_lookup({"syn": [CPU, 256]})
    await worker.heartbeat({CPU: 5})  # batches 2..5 were lost
    request = (await _requests(worker, "replay"))[0]
    assert (request.command.first_seq, request.command.last_seq) == (2, 5)


async def test_a_range_no_longer_retained_falls_back_to_a_resync_of_that_location(gap_rig: Rig) -> None:
    rig = gap_rig
    worker = await rig.worker()
    await worker.serve_commands(_replay_policy(worker, retained=False))
    await worker.publish(worker.batch(CPU, HASHES[:2], reset=True))  # seq 1
    await rig.wait_lookup({"syn": [CPU, 512]})
    await worker.publish(worker.batch(CPU, HASHES[2:3], seq=3))  # seq 2 never arrives
    requests = await _requests(worker, "resync")
    assert requests[0].command.locations == [CPU]
    assert _count(rig, "replays") == 1 and _count(rig, "resyncs") == 1
    # what the worker holds now, sent as the resync's reset batch
    await worker.publish(worker.batch(CPU, HASHES, reset=True))
    await rig.wait_lookup({"syn": [CPU, 1024]})
    with anyio.fail_after(10):
        while (record := rig.handle.controller.check_finish(requests[0].event_id)).status == "running":
            await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll
    assert record.status == "finished" and record.kind == "resync"


async def test_batches_older_than_a_clear_are_ignored_and_the_clear_batch_applies(rig: Rig) -> None:
    worker = await rig.worker()
    await worker.serve_commands(lambda req: worker.reply(num_tokens=512, last_seq={CPU: 3}))
    await worker.publish(worker.batch(CPU, HASHES[:2], reset=True))  # seq 1
    await rig.wait_lookup({"syn": [CPU, 512]})
    late = worker.batch(CPU, HASHES[2:3])  # seq 2: published before the clear, arrives after it
    response = await rig.http.post("/clear", json={"instance_id": "syn", "location": CPU})
    assert response.status_code == 200, response.text
    assert response.json()["num_tokens"] == 512
    assert await rig.lookup() == {}
    await worker.publish(late)
    # seq 3 holds the clear event, then a new admit of the first chunk
    kinds = np.array([EventKind.CLEAR, EventKind.ADMIT], dtype=np.uint8)
    clear_batch = EventBatch.build(
        worker.ident, CPU, 3, kinds, np.array([0, HASHES[0]], dtype=np.uint64), np.array([512, 256], dtype=np.uint32)
    )
    await worker.publish(clear_batch)
    await rig.wait_lookup({"syn": [CPU, 256]})
    assert rig.handle.controller.workers[("syn", 0)].locations[CPU].applied_seq == 3


async def test_a_new_epoch_registration_forgets_what_the_previous_run_held(rig: Rig) -> None:
    worker = await rig.worker()
    await worker.publish(worker.batch(CPU, HASHES, reset=True))
    await rig.wait_lookup({"syn": [CPU, 1024]})
    await worker.goodbye()  # a clean stop; a crashed run is replaced once its heartbeats stop
    with anyio.fail_after(10):
        while rig.handle.controller.workers:
            await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll
    restarted = await rig.worker()  # same instance and rank, fresh epoch
    assert restarted.ident.epoch != worker.ident.epoch
    assert await rig.lookup() == {}
    await worker.publish(worker.batch(CPU, HASHES))  # the old run's batch is not credited
    await restarted.publish(restarted.batch(CPU, HASHES[:1], reset=True))
    await rig.wait_lookup({"syn": [CPU, 256]})


async def test_a_silent_worker_leaves_the_index_after_the_heartbeat_timeout(rig: Rig) -> None:
    worker = await rig.worker()
    await worker.publish(worker.batch(CPU, HASHES, reset=True))
    await rig.wait_lookup({"syn": [CPU, 1024]})
    silent_since = time.monotonic()
    await rig.wait_lookup({}, timeout=HEARTBEAT_TIMEOUT + 5)
    assert time.monotonic() - silent_since >= HEARTBEAT_TIMEOUT * 0.9
    response = await rig.http.get("/instances")
    assert response.json() == {"instances": []}


class HelloRecorder:
    """Every hello the controller publishes, fleet-wide or to one worker, in order."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, Hello]] = []

    async def __call__(self, msg: Message) -> None:
        self.heard.append((msg.topic, Hello.decode(msg.payload)))

    async def listen(self, bus: MessageBus) -> "HelloRecorder":
        await bus.subscribe(f"{HELLO_TOPIC}.>", self)
        await bus.subscribe(HELLO_TOPIC, self)
        await bus.flush()
        return self


async def test_a_heartbeat_from_an_unknown_worker_gets_a_hello_to_that_run_only(rig: Rig) -> None:
    hellos = await HelloRecorder().listen(rig.bus)
    stranger = SyntheticWorker(rig.bus, "stranger")
    with anyio.fail_after(10):
        while not hellos.heard:
            await stranger.heartbeat()
            await anyio.sleep(0.05)
    assert hellos.heard[0] == (hello_topic("stranger", 0), Hello(epoch=stranger.ident.epoch))
    assert all(topic != HELLO_TOPIC for topic, _ in hellos.heard)  # nobody else was disturbed


async def test_a_registration_with_an_unknown_hash_scheme_is_refused(rig: Rig) -> None:
    worker = SyntheticWorker(rig.bus, "odd")
    worker.registration.hashing.scheme = "sha256/v9"
    ack = await worker.register()
    assert not ack.accepted
    assert "sha256/v9" in ack.detail


async def test_heartbeats_of_a_refused_worker_do_not_make_the_controller_say_hello(rig: Rig) -> None:
    controller = rig.handle.controller
    hellos = await HelloRecorder().listen(rig.bus)
    refused = SyntheticWorker(rig.bus, "odd")
    refused.registration.hashing.scheme = "sha256/v9"
    assert not (await refused.register()).accepted
    stranger = SyntheticWorker(rig.bus, "stranger")
    # both keep heartbeating, as workers do: an unknown run is asked once heard for a second
    with anyio.fail_after(10):  # an unknown worker that was not refused still gets one
        while not hellos.heard:
            await controller.heartbeat(Heartbeat(**refused.ident.model_dump(exclude={"version"})))
            await controller.heartbeat(Heartbeat(**stranger.ident.model_dump(exclude={"version"})))
            await anyio.sleep(0.1)  # the heartbeat interval
    # published in order on one connection: the refused one's would have come first
    assert [topic for topic, _ in hellos.heard] == [hello_topic("stranger", 0)]


@pytest.fixture
async def quick_rig(nats_url: str) -> AsyncIterator[Rig]:
    async for r in _rig(nats_url, controller_command_timeout=0.5):
        yield r


async def test_clear_on_a_worker_that_never_answers_is_a_504_naming_it(quick_rig: Rig) -> None:
    rig = quick_rig
    worker = await rig.worker("mute")
    await worker.serve_commands(lambda req: None)  # listens, never replies
    started = time.monotonic()
    response = await rig.http.post("/clear", json={"instance_id": "mute", "location": CPU})
    assert response.status_code == 504
    assert "mute/0" in response.json()["detail"]
    assert time.monotonic() - started < 3.0
    health = await rig.http.post("/health", json={"instance_id": "mute"})
    assert health.status_code == 200
    assert health.json()["error_codes"] == {"0": 1}


async def test_clear_on_a_worker_nobody_listens_for_is_a_504(quick_rig: Rig) -> None:
    await quick_rig.worker("gone")
    response = await quick_rig.http.post("/clear", json={"instance_id": "gone", "location": CPU})
    assert response.status_code == 504
    assert "gone/0" in response.json()["detail"]
