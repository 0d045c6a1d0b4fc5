"""The worker against a real nats-server and engine (CPU + disk); the test plays the controller."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from lmcache_core.events import EventKind, KVEvent
from lmcache_core.keys import HASH_SCHEME, TokenHasher
from lmcache_core.testing import free_port, running_nats_server
from lmcache_core.wire import (
    HELLO_TOPIC,
    ClearCommand,
    EventBatch,
    Hello,
    InventoryCommand,
    LookupCommand,
    PingCommand,
    RegistrationAck,
    ReplayCommand,
    ResyncCommand,
    WorkerIdentity,
    command_topic,
    hello_topic,
)
from lmcache_core.worker import pack_events

from .conftest import INSTANCE, PROMPT, WAIT, ControllerPeer, kv

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def reset_batches(peer: ControllerPeer, location: str, epoch: str) -> list[EventBatch]:
    return [b for b in peer.batches_for(location, epoch) if b.reset]


def held_by(batches: list[EventBatch]) -> set[int]:
    """Replay batches the way a controller does: what a location holds afterwards."""
    held: set[int] = set()
    for batch in batches:
        if batch.reset:
            held.clear()
        for kind, h, _ in zip(*batch.arrays(), strict=True):
            if kind == EventKind.ADMIT:
                held.add(int(h))
            elif kind == EventKind.EVICT:
                held.discard(int(h))
            else:
                held.clear()
    return held


def test_registration_describes_model_hashing_and_locations(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings(namespace="tenant-a", chunk_size=128))
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)
    reg = peer.wait_until(lambda: peer.registrations, what="a registration")[0]
    assert (reg.instance_id, reg.worker_id, reg.world_size) == (INSTANCE, 0, 1)
    assert (reg.model_name, reg.kv_dtype) == ("test-model", "bfloat16")
    assert (reg.hashing.scheme, reg.hashing.chunk_size, reg.hashing.namespace) == (
        HASH_SCHEME,
        128,
        "tenant-a",
    )
    assert reg.locations == [CPU, DISK]
    assert reg.pid == os.getpid() and reg.epoch == worker.identity.epoch


def test_inventory_is_sent_with_reset_per_location_after_registering(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    tokens = list(range(600))  # chunks of 256, 256 and 88 tokens
    assert instance.engine.store(tokens, kv(600)) == 600
    assert instance.engine.flush(WAIT)
    worker = instance.start_worker()  # the stores happened before: only the resync tells
    assert worker.wait_registered(WAIT)
    expected = set(TokenHasher(256).hashes(tokens))
    for location in (CPU, DISK):
        first = peer.wait_until(
            lambda loc=location: reset_batches(peer, loc, worker.identity.epoch), what=location
        )[0]
        kinds, hashes, counts = first.arrays()
        assert set(hashes.tolist()) == expected
        assert sorted(counts.tolist()) == [88, 256, 256]
        assert set(kinds.tolist()) == {EventKind.ADMIT}


def test_events_are_published_in_order_with_contiguous_seqs(
    make_settings, make_instance, peer
) -> None:
    # small batches and chunks, so the stream spans many batches
    instance = make_instance(make_settings(chunk_size=16, worker_event_batch_size=7))
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)
    seen: list[KVEvent] = []
    instance.engine.subscribe(seen.append)
    for i in range(20):
        instance.engine.store(list(range(i * 1000, i * 1000 + 40)), kv(40, seed=i))
    instance.engine.clear(CPU)
    instance.engine.store(list(range(50)), kv(50))
    assert worker.sync(WAIT)
    want = [
        (int(e.kind), e.key.chunk_hash if e.key else 0, e.num_tokens)
        for e in seen
        if e.location == CPU
    ]

    def stream() -> list[tuple[int, int, int]] | None:
        batches = [
            b for b in peer.batches if b.location == CPU and b.epoch == worker.identity.epoch
        ]
        got = [
            t
            for b in batches
            if not b.reset
            for t in zip(*(a.tolist() for a in b.arrays()), strict=True)
        ]
        return got if len(got) >= len(want) else None

    got = peer.wait_until(stream, what="every CPU event")
    assert got == want
    seqs = [b.seq for b in peer.batches_for(CPU, worker.identity.epoch)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(len(b.arrays()[0]) <= 7 for b in peer.batches_for(CPU))


def test_clear_removes_the_data_and_replies_tokens_and_the_seq_holding_the_clear(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    instance.engine.store(PROMPT, kv(len(PROMPT)))
    assert worker.wait_registered(WAIT)
    reply = peer.command(ClearCommand(location=CPU))
    assert reply.ok and reply.num_tokens == 12 and reply.location == CPU
    assert instance.engine.backends[CPU].inventory() == []
    seq = reply.last_seq[CPU]

    def the_batch() -> list[EventBatch]:
        return [b for b in peer.batches_for(CPU, worker.identity.epoch) if b.seq == seq]

    batch = peer.wait_until(the_batch, what=f"batch {seq}")[0]
    kinds, _, tokens = batch.arrays()
    assert kinds[-1] == EventKind.CLEAR and tokens[-1] == 12
    assert peer.command(ClearCommand(location=CPU)).num_tokens == 0


def test_unknown_location_reply_lists_the_available_locations(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    assert instance.start_worker().wait_registered(WAIT)
    reply = peer.command(ClearCommand(location="GPUBackend"))
    assert not reply.ok and reply.error_kind == "unknown_location"
    assert reply.available_locations == [CPU, DISK]
    assert "GPUBackend" in reply.error and "LocalCPUBackend" in reply.error
    resync = peer.command(ResyncCommand(locations=["Nowhere"]))
    assert resync.error_kind == "unknown_location"


def test_lookup_reports_the_prefix_and_the_location_holding_most_of_it(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    assert instance.start_worker().wait_registered(WAIT)
    tokens = list(range(300))
    instance.engine.store(tokens, kv(300))
    assert instance.engine.flush(WAIT)
    reply = peer.command(LookupCommand(tokens=tokens))
    assert (reply.ok, reply.num_tokens, reply.location) == (True, 300, CPU)  # tie: the fastest
    longer = peer.command(LookupCommand(tokens=tokens + [7, 8, 9]))
    assert longer.num_tokens == 256  # the stored partial chunk names a different prefix
    instance.engine.clear(CPU)
    reply = peer.command(LookupCommand(tokens=tokens))
    assert (reply.num_tokens, reply.location) == (300, DISK)
    miss = peer.command(LookupCommand(tokens=[5, 4, 3]))
    assert (miss.ok, miss.num_tokens, miss.location) == (True, 0, None)


def _registered_holding_prompt(make_settings, make_instance, **settings):
    """An instance holding PROMPT whose worker registered: (instance, worker, tokens stored)."""
    instance = make_instance(make_settings(**settings))
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)
    stored = instance.engine.store(PROMPT, kv(12))
    return instance, worker, stored


def test_resync_command_resends_the_inventory_with_reset(
    make_settings, make_instance, peer
) -> None:
    instance, worker, _ = _registered_holding_prompt(make_settings, make_instance)
    reply = peer.command(ResyncCommand(locations=[CPU]))
    assert reply.ok and set(reply.last_seq) == {CPU}
    seq = reply.last_seq[CPU]
    batch = peer.wait_until(
        lambda: [b for b in peer.batches_for(CPU, worker.identity.epoch) if b.seq == seq],
        what="resync",
    )[0]
    assert batch.reset and batch.arrays()[1].tolist() == TokenHasher(256).hashes(PROMPT)
    assert held_by(peer.batches_for(CPU, worker.identity.epoch)) == set(
        TokenHasher(256).hashes(PROMPT)
    )


def test_inventory_pages_answer_one_snapshot_as_of_the_last_batch_published(
    make_settings, make_instance, peer
) -> None:
    instance, worker, _ = _registered_holding_prompt(make_settings, make_instance)
    long_prompt = list(range(10_000, 10_000 + 12 * 256))
    instance.engine.store(long_prompt, kv(len(long_prompt)))  # 12 chunks more, still pending
    first = peer.command(InventoryCommand(location=CPU, limit=5))
    assert first.ok and first.inventory is not None
    page = first.inventory
    # pending events went out first: the snapshot holds every batch up to its seq
    assert (page.location, page.offset, page.total, page.seq) == (CPU, 0, 13, worker.last_seq()[CPU])
    instance.engine.store(list(range(5000, 5256)), kv(256))  # after the snapshot: not in it
    hashes = list(page.arrays()[0])
    while len(hashes) < page.total:
        nxt = peer.command(InventoryCommand(location=CPU, snapshot=page.snapshot, offset=len(hashes), limit=5))
        assert nxt.ok and nxt.inventory.snapshot == page.snapshot and nxt.inventory.offset == len(hashes)
        hashes += list(nxt.inventory.arrays()[0])
    assert sorted(hashes) == sorted(TokenHasher(256).hashes(PROMPT) + TokenHasher(256).hashes(long_prompt))
    # the last page was answered: the snapshot is gone, and asking again says so
    gone = peer.command(InventoryCommand(location=CPU, snapshot=page.snapshot, offset=0, limit=5))
    assert (gone.ok, gone.error_kind) == (False, "no_snapshot")
    unknown = peer.command(InventoryCommand(location="Nowhere"))
    assert unknown.error_kind == "unknown_location"


def test_a_replay_publishes_the_retained_batches_of_the_range_again_unchanged(
    make_settings, make_instance, peer
) -> None:
    _, worker, _ = _registered_holding_prompt(make_settings, make_instance)
    assert worker.sync(WAIT)
    last = worker.last_seq()[CPU]
    def received(start: int, count: int) -> list[EventBatch] | None:
        batches = peer.batches_for(CPU)[start:]
        return batches if len(batches) >= count else None

    published = peer.wait_until(lambda: received(0, last), what="the batches")
    reply = peer.command(ReplayCommand(location=CPU, first_seq=1, last_seq=last + 10))
    assert reply.ok and reply.last_seq == {CPU: last}  # nothing beyond what it published
    again = peer.wait_until(lambda: received(last, last), what="the replayed batches")
    assert [b.seq for b in again] == list(range(1, last + 1))
    assert again == published[:last]  # the same batches, reset flag and all


def test_a_replay_of_batches_no_longer_retained_says_so(make_settings, make_instance, peer) -> None:
    _, worker, _ = _registered_holding_prompt(make_settings, make_instance, worker_replay_batches=1)
    assert worker.sync(WAIT)
    reply = peer.command(ReplayCommand(location=CPU, first_seq=1, last_seq=worker.last_seq()[CPU]))
    assert not reply.ok and reply.error_kind == "not_retained" and "no longer retained" in reply.error


def test_a_command_read_after_its_deadline_is_not_carried_out(
    make_settings, make_instance, peer, caplog: pytest.LogCaptureFixture
) -> None:
    instance, _, stored = _registered_holding_prompt(make_settings, make_instance)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.worker"):
        late = peer.command(ClearCommand(location=CPU), deadline=time.time() - 1.0)
    assert not late.ok and late.error_kind == "expired" and "not carried out" in late.error
    assert "after its deadline" in caplog.text
    assert instance.engine.lookup(PROMPT) == stored  # still there
    in_time = peer.command(ClearCommand(location=CPU), deadline=time.time() + WAIT)
    assert in_time.ok and in_time.num_tokens == stored


def test_a_bad_command_gets_an_error_reply_and_the_worker_keeps_serving(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    assert instance.start_worker().wait_registered(WAIT)
    topic = command_topic(INSTANCE, 0)
    from lmcache_core.wire import CommandReply

    for payload in (
        b"not json",
        b'{"event_id": "x", "command": {"op": "format_disk"}}',
        b'{"version": 9, "event_id": "x", "command": {"op": "ping"}, "extra": 1}',
    ):
        reply = CommandReply.decode(peer.request(topic, payload))
        assert not reply.ok and reply.error_kind == "bad_request" and reply.error
    assert "version 9" in reply.error
    pong = peer.command(PingCommand())
    assert pong.ok and pong.registration is not None and pong.registration.locations == [CPU, DISK]


def test_heartbeats_carry_last_seq_and_chunk_counts(make_settings, make_instance, peer) -> None:
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)  # no resync after this point moves the seqs on
    instance.engine.store(list(range(600)), kv(600))
    assert instance.engine.flush(WAIT)
    assert worker.sync(WAIT)
    want = worker.last_seq()
    beat = peer.wait_until(
        lambda: [
            h for h in peer.heartbeats if h.last_seq == want and h.chunks == {CPU: 3, DISK: 3}
        ],
        what=f"a heartbeat with {want}",
    )[0]
    assert beat.epoch == worker.identity.epoch


def test_worker_reregisters_and_resyncs_after_the_nats_server_restarts(
    make_settings, make_instance, peer, nats_server
) -> None:
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    instance.engine.store(PROMPT, kv(12))
    assert worker.wait_registered(WAIT)
    peer.wait_until(lambda: len(peer.registrations) == 1)
    nats_server.stop()
    instance.engine.clear(CPU)  # happens while the bus is down
    instance.engine.store(list(range(100)), kv(100))
    nats_server.start()
    peer.wait_until(lambda: len(peer.registrations) >= 2, what="a second registration")
    assert peer.registrations[-1].epoch == worker.identity.epoch
    want = {CPU: set(TokenHasher(256).hashes(list(range(100))))}
    peer.wait_until(
        lambda: (
            held_by(peer.batches_for(CPU, worker.identity.epoch)) == want[CPU]
            and reset_batches(peer, CPU, worker.identity.epoch)[1:]
        ),
        what="the index to converge after a resync",
    )


def test_controller_hello_makes_the_worker_register_and_resync_again(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)
    peer.wait_until(lambda: len(reset_batches(peer, CPU, worker.identity.epoch)) == 1)
    peer.publish(HELLO_TOPIC, b"{}")
    peer.wait_until(lambda: len(peer.registrations) >= 2, what="registration after hello")
    peer.wait_until(
        lambda: len(reset_batches(peer, CPU, worker.identity.epoch)) >= 2, what="resync after hello"
    )


def test_a_hello_to_this_run_makes_it_register_again_and_one_to_another_run_does_not(
    make_settings, make_instance, peer
) -> None:
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)

    class Delivered:
        topic = hello_topic(INSTANCE, 0)

        def __init__(self, hello: Hello) -> None:
            self.payload = hello.encode()

    async def asks_to_register(hello: Hello) -> bool:
        # on the worker's loop: nothing else runs between handling the hello and the check
        await worker._on_hello(Delivered(hello))
        return worker._reregister.is_set()

    assert worker._portal is not None
    assert not worker._portal.call(asks_to_register, Hello(epoch="another-run"))  # a duplicate's
    assert worker._portal.call(asks_to_register, Hello(epoch=worker.identity.epoch))
    peer.wait_until(lambda: len(peer.registrations) >= 2, what="registration after its own hello")
    assert worker._portal.call(asks_to_register, Hello())  # the fleet-wide hello


def test_closing_a_registered_worker_says_goodbye_with_its_epoch(make_settings, make_instance, peer) -> None:
    goodbyes: list[WorkerIdentity] = []

    async def on_goodbye(msg) -> None:
        peer._record(goodbyes, WorkerIdentity.decode(msg.payload))

    peer.portal.call(peer._bus.subscribe, "goodbye.*.*", on_goodbye)
    instance = make_instance(make_settings())
    worker = instance.start_worker()
    assert worker.wait_registered(WAIT)
    worker.close()
    peer.wait_until(lambda: goodbyes, what="the goodbye")
    assert goodbyes == [worker.identity]


def test_worker_keeps_retrying_until_a_controller_answers(
    make_settings, make_instance, nats_server
) -> None:
    settings = make_settings()
    listener = ControllerPeer(settings, nats_server.url, answer_register=False).start()
    try:
        instance = make_instance(settings)
        worker = instance.start_worker()
        listener.wait_until(
            lambda: len(listener.heartbeats) >= 3, what="heartbeats without a controller"
        )
        assert not worker.registered
        controller = ControllerPeer(settings, nats_server.url).start()
        try:
            controller.publish(HELLO_TOPIC, b"{}")
            assert worker.wait_registered(WAIT)
        finally:
            controller.close()
    finally:
        listener.close()


class RefusingPeer(ControllerPeer):
    """A controller that refuses every registration, noting when each attempt arrived."""

    async def _on_register(self, msg) -> None:
        self._record(self.registrations, time.monotonic())
        ack = RegistrationAck(accepted=False, resync=False, detail="refused by the test")
        await msg.respond(ack.encode())


def test_a_hello_does_not_make_a_refused_worker_retry_without_backoff(
    make_settings, make_instance, nats_server
) -> None:
    settings = make_settings()
    refusing = RefusingPeer(settings, nats_server.url).start()
    try:
        make_instance(settings).start_worker()
        refusing.wait_until(lambda: refusing.registrations, what="a first registration")
        refusing.publish(HELLO_TOPIC, b"{}")
        times = refusing.wait_until(
            lambda: list(refusing.registrations) if len(refusing.registrations) >= 5 else None,
            what="five registration attempts",
        )
        # the hello cuts one wait short; the attempts after it back off again (>= 0.1 s each)
        assert times[4] - times[2] >= 0.1
    finally:
        refusing.close()


def test_worker_connects_once_the_bus_comes_up(make_settings, make_instance) -> None:
    port = free_port()
    settings = make_settings(controller_url=f"127.0.0.1:{port}", nats_connect_timeout=0.5)
    instance = make_instance(settings)
    worker = instance.start_worker()
    instance.engine.store(PROMPT, kv(12))  # the engine works without a bus
    assert not worker.wait_registered(0.3)
    with running_nats_server(port=port) as server:
        controller = ControllerPeer(settings, server.url).start()
        try:
            assert worker.wait_registered(WAIT)
            controller.wait_until(
                lambda: held_by(controller.batches_for(CPU)) == set(TokenHasher(256).hashes(PROMPT))
            )
        finally:
            controller.close()


def test_unused_lmcache_keys_are_named_in_one_info_line(
    make_settings, make_instance, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        distributed_url="localhost:8002",
        lmcache_worker_ports=[8001, 8002],
        p2p_host="localhost",
        p2p_init_ports=8200,
    )
    with caplog.at_level(logging.INFO, logger="lmcache_core.worker"):
        make_instance(settings).start_worker()
    lines = [r for r in caplog.records if "LMCache compatibility" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    for key in ("distributed_url", "lmcache_worker_ports", "p2p_host", "p2p_init_ports"):
        assert key in lines[0].getMessage()
    assert "lmcache_worker_port," not in lines[0].getMessage()


def test_engine_with_enable_controller_starts_and_stops_its_worker(make_settings, pm, peer) -> None:
    from lmcache_core.engine import CacheEngine, EngineMetadata

    with CacheEngine(make_settings(), EngineMetadata("m"), pm) as engine:
        engine.store(PROMPT, kv(12))
        peer.wait_until(
            lambda: held_by(peer.batches_for(CPU)) == set(TokenHasher(256).hashes(PROMPT))
        )


def test_pack_events_splits_locations_and_keeps_order() -> None:
    from lmcache_core.keys import ChunkKey

    def key(h: int) -> ChunkKey:
        return ChunkKey("m", 1, 0, "bfloat16", h)

    events = [
        KVEvent(EventKind.ADMIT, "A", key(1), 256, 1),
        KVEvent(EventKind.ADMIT, "B", key(2), 256, 1),
        KVEvent(EventKind.EVICT, "A", key(1), 256, 2),
        KVEvent(EventKind.CLEAR, "B", None, 256, 2),
        KVEvent(EventKind.ADMIT, "A", key(2**64 - 1), 12, 3),
    ]
    packed = pack_events(events)
    assert list(packed) == ["A", "B"]
    kinds, hashes, tokens = packed["A"]
    assert (
        kinds.tolist() == [1, 2, 1]
        and hashes.tolist() == [1, 1, 2**64 - 1]
        and tokens.tolist() == [256, 256, 12]
    )
    kinds, hashes, tokens = packed["B"]
    assert kinds.tolist() == [1, 3] and hashes.tolist() == [2, 0]
    assert hashes.dtype == np.dtype("<u8") and tokens.dtype == np.dtype("<u4")


def test_close_is_prompt_and_leaves_no_thread_while_the_bus_is_down(
    make_settings, pm, peer, nats_server
) -> None:
    import threading
    import time

    from lmcache_core.engine import CacheEngine, EngineMetadata
    from lmcache_core.worker import start_worker

    engine = CacheEngine(make_settings(), EngineMetadata("m"), pm, start_worker=False)
    try:
        before = set(threading.enumerate())
        worker = start_worker(engine)
        assert worker.wait_registered(WAIT)
        nats_server.stop()
        engine.store(PROMPT, kv(12))  # the engine keeps working without its bus
        assert engine.lookup(PROMPT) == 12
        start = time.monotonic()
        worker.close()
        assert time.monotonic() - start < 6.0
        for thread in set(threading.enumerate()) - before:  # the loop's helpers wind down
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} outlived the worker"

    finally:
        engine.close()
