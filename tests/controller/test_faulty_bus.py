"""``lmcache_core.testing.FaultyBus`` on a real nats-server: what each fault does to the order
and the timing of what a subscriber receives (the model-based test relies on it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

from lmcache_core.errors import RequestTimeout
from lmcache_core.plugins import get_plugin_manager, resolve_transport
from lmcache_core.testing import FaultPlan, FaultyBus
from lmcache_core.transport import Message, MessageBus

from .support import controller_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[MessageBus]:
    connected = await resolve_transport(get_plugin_manager(), "nats").connect(controller_settings(), nats_url)
    try:
        yield connected
    finally:
        await connected.aclose()


async def _received(bus: MessageBus, topic: str) -> list[bytes]:
    got: list[bytes] = []

    async def on_message(msg: Message) -> None:
        got.append(msg.payload)

    await bus.subscribe(topic, on_message)
    await bus.flush()
    return got


async def _until(got: list[bytes], count: int) -> None:
    with anyio.fail_after(10):
        while len(got) < count:
            await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll


async def test_reorder_lets_the_next_message_overtake_and_duplicate_sends_twice(bus: MessageBus) -> None:
    got = await _received(bus, "events.x.0")
    faulty = FaultyBus(bus, FaultPlan("reorder", "pass", "duplicate"))
    for payload in (b"1", b"2", b"3"):
        await faulty.publish("events.x.0", payload)
    await _until(got, 4)
    assert got == [b"2", b"1", b"3", b"3"] and faulty.kept == 0


async def test_delay_holds_a_message_until_a_publish_after_its_time(bus: MessageBus) -> None:
    got = await _received(bus, "events.x.0")
    faulty = FaultyBus(bus, FaultPlan("delay", delay=0.3))
    started = time.monotonic()
    await faulty.publish("events.x.0", b"late")
    await faulty.publish("events.x.0", b"on time")  # overtakes it
    await _until(got, 1)
    assert got == [b"on time"] and faulty.kept == 1
    while faulty.kept:  # a heartbeat's publish, every so often, lets it out once due
        await faulty.publish("heartbeat.x.0", b"beat")
        await anyio.sleep(0.05)  # the heartbeat interval
    await _until(got, 2)
    assert got == [b"on time", b"late"] and time.monotonic() - started >= 0.3


async def test_hold_waits_for_release_in_either_order(bus: MessageBus) -> None:
    got = await _received(bus, "events.x.0")
    faulty = FaultyBus(bus, FaultPlan("hold", "hold", "reorder"))
    for payload in (b"1", b"2", b"3"):
        await faulty.publish("events.x.0", payload)
    assert faulty.kept == 3
    assert await faulty.release(reverse=True) == 3
    await _until(got, 3)
    assert got == [b"2", b"1", b"3"]


async def test_a_request_can_be_delayed_or_dropped(bus: MessageBus) -> None:
    async def echo(msg: Message) -> None:
        await msg.respond(msg.payload)

    await bus.subscribe("register.x.0", echo)
    await bus.flush()
    faulty = FaultyBus(bus, FaultPlan("delay", "drop", prefix="register.", delay=0.3))
    started = time.monotonic()
    assert await faulty.request("register.x.0", b"hi", timeout=5.0) == b"hi"
    assert time.monotonic() - started >= 0.3
    with pytest.raises(RequestTimeout):
        await faulty.request("register.x.0", b"lost", timeout=0.2)
    assert faulty.dropped == [("register.x.0", b"lost")]
    assert await faulty.request("register.x.0", b"again", timeout=5.0) == b"again"
