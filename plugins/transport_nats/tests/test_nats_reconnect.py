"""Surviving a nats-server restart: callbacks fire and publishes made while down arrive."""

from __future__ import annotations

import anyio
import pytest

from lmcache_core.errors import TransportError
from lmcache_core.transport import Message

pytestmark = pytest.mark.anyio


async def _wait_until(condition, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)  # polling a client state that has no event, under a deadline


async def test_publishes_made_while_server_is_down_are_delivered_after_restart(
    nats_server, open_bus
):
    # The subscriber redials every 20 ms, the publisher waits 1.5 s after its last dial, so the
    # subscriber is back (and subscribed again) before the publisher flushes its buffer; core
    # NATS drops messages nobody is subscribed to at that moment.
    subscriber = await open_bus(nats_server.url, nats_reconnect_wait=0.02)
    publisher = await open_bus(nats_server.url, nats_reconnect_wait=1.5)
    sub_back, pub_back = anyio.Event(), anyio.Event()
    reconnects: list[str] = []

    async def on_sub_reconnect() -> None:
        reconnects.append("subscriber")
        sub_back.set()

    async def on_pub_reconnect() -> None:
        reconnects.append("publisher")
        pub_back.set()

    subscriber.on_reconnect(on_sub_reconnect)
    publisher.on_reconnect(on_pub_reconnect)
    received: list[bytes] = []
    all_in = anyio.Event()

    async def collect(message: Message) -> None:
        received.append(message.payload)
        if len(received) == 50:
            all_in.set()

    await subscriber.subscribe("events.>", collect)

    await nats_server.astop()
    await _wait_until(lambda: not publisher.is_connected and not subscriber.is_connected)
    sent = [f"event-{i}".encode() for i in range(50)]
    for payload in sent:
        await publisher.publish("events.admit", payload)  # kept in nats-py's pending buffer
    await nats_server.astart()

    with anyio.fail_after(10):
        await sub_back.wait()
        await pub_back.wait()
        await all_in.wait()
    assert received == sent
    assert reconnects[0] == "subscriber"
    assert publisher.is_connected and subscriber.is_connected


async def test_on_reconnect_callbacks_run_in_order_after_each_reconnect(nats_server, open_bus):
    bus = await open_bus(nats_server.url, nats_reconnect_wait=0.02)
    calls: list[str] = []
    second_ran = anyio.Event()

    async def first() -> None:
        calls.append("first")

    async def failing() -> None:
        raise RuntimeError("a broken callback must not stop the others")

    async def second() -> None:
        calls.append("second")
        second_ran.set()

    for callback in (first, failing, second):
        bus.on_reconnect(callback)

    for round_number in (1, 2):
        await nats_server.astop()
        await _wait_until(lambda: not bus.is_connected)
        await nats_server.astart()
        with anyio.fail_after(10):
            await second_ran.wait()
        second_ran = anyio.Event()
        assert calls == ["first", "second"] * round_number


async def test_publish_beyond_the_reconnect_buffer_raises_transport_error(nats_server, open_bus):
    bus = await open_bus(nats_server.url, nats_pending_bytes=4096)
    await nats_server.astop()
    await _wait_until(lambda: not bus.is_connected)
    with pytest.raises(TransportError, match="nats_pending_bytes=4096"):
        for _ in range(100):
            await bus.publish("t", b"x" * 100)


async def test_aclose_while_disconnected_returns_promptly(nats_server, open_bus):
    bus = await open_bus(nats_server.url)
    await nats_server.astop()
    await _wait_until(lambda: not bus.is_connected)
    with anyio.fail_after(5):
        await bus.aclose()


async def test_flush_while_disconnected_waits_for_the_reconnect(nats_server, open_bus):
    bus = await open_bus(nats_server.url, nats_reconnect_wait=0.02)
    await nats_server.astop()
    await _wait_until(lambda: not bus.is_connected)
    await bus.publish("t", b"kept")
    with pytest.raises(TransportError, match="within 0.2s.*disconnected"):
        await bus.flush(timeout=0.2)
    await nats_server.astart()
    await bus.flush(timeout=10)  # confirmed once the buffered publish reached the new server
    assert bus.is_connected
