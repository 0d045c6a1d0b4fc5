"""Publish/subscribe, request/reply and errors of the NATS bus against a real nats-server."""

from __future__ import annotations

import anyio
import pytest

from lmcache_core.errors import NoResponders, RequestTimeout, TransportError
from lmcache_core.transport import Message

pytestmark = pytest.mark.anyio


class Inbox:
    """Collects received messages and wakes the test when enough have arrived."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = anyio.Event()

    async def __call__(self, message: Message) -> None:
        self.messages.append((message.topic, message.payload))
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        with anyio.fail_after(timeout):
            while len(self.messages) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.messages


async def test_subscribers_receive_by_single_and_multi_token_wildcards(nats_url, open_bus):
    pub = await open_bus(nats_url)
    sub = await open_bus(nats_url)
    one_token, rest = Inbox(), Inbox()
    await sub.subscribe("kv.*.admit", one_token)
    await sub.subscribe("kv.>", rest)

    await pub.publish("kv.w1.admit", b"a")
    await pub.publish("kv.w1.evict", b"b")
    await pub.publish("kv.w1.deep.admit", b"c")
    await pub.publish("other.w1.admit", b"d")

    assert await rest.wait_for(3) == [
        ("kv.w1.admit", b"a"),
        ("kv.w1.evict", b"b"),
        ("kv.w1.deep.admit", b"c"),
    ]
    assert await one_token.wait_for(1) == [("kv.w1.admit", b"a")]
    await pub.flush()
    await sub.flush()  # the round trip proves nothing else was queued for one_token
    assert one_token.messages == [("kv.w1.admit", b"a")]


async def test_handler_sees_messages_in_publish_order(nats_url, open_bus):
    pub = await open_bus(nats_url)
    sub = await open_bus(nats_url)
    inbox = Inbox()

    async def slow_handler(message: Message) -> None:
        await anyio.lowlevel.checkpoint()  # yield between messages: order must still hold
        await inbox(message)

    await sub.subscribe("seq", slow_handler)
    payloads = [i.to_bytes(4, "big") for i in range(500)]
    for payload in payloads:
        await pub.publish("seq", payload)
    assert [p for _, p in await inbox.wait_for(500)] == payloads


async def test_failing_handler_does_not_end_the_subscription(nats_url, open_bus):
    bus = await open_bus(nats_url)
    inbox = Inbox()

    async def handler(message: Message) -> None:
        if message.payload == b"bad":
            raise ValueError("handler bug")
        await inbox(message)

    await bus.subscribe("t", handler)
    await bus.publish("t", b"bad")
    await bus.publish("t", b"good")
    assert await inbox.wait_for(1) == [("t", b"good")]


async def test_request_gets_the_reply_of_the_subscriber(nats_url, open_bus):
    server = await open_bus(nats_url)
    client = await open_bus(nats_url)

    async def echo(message: Message) -> None:
        await message.respond(message.topic.encode() + b":" + message.payload)

    await server.subscribe("cmd.*", echo)
    assert await client.request("cmd.clear", b"all", timeout=5) == b"cmd.clear:all"


async def test_request_without_reply_in_time_raises_request_timeout(nats_url, open_bus):
    server = await open_bus(nats_url)
    client = await open_bus(nats_url)

    async def ignore(message: Message) -> None:
        return None

    await server.subscribe("cmd.slow", ignore)
    start = anyio.current_time()
    with pytest.raises(RequestTimeout, match=r"'cmd\.slow'.*0\.2s"):
        await client.request("cmd.slow", b"", timeout=0.2)
    assert anyio.current_time() - start < 2


async def test_request_to_a_topic_nobody_listens_on_raises_no_responders(nats_url, open_bus):
    client = await open_bus(nats_url)
    with pytest.raises(NoResponders, match="'cmd.nobody'"):
        await client.request("cmd.nobody", b"", timeout=5)


async def test_responding_to_a_plain_publish_raises_transport_error(nats_url, open_bus):
    bus = await open_bus(nats_url)
    errors: list[Exception] = []
    done = anyio.Event()

    async def handler(message: Message) -> None:
        try:
            await message.respond(b"x")
        except TransportError as exc:
            errors.append(exc)
        done.set()

    await bus.subscribe("plain", handler)
    await bus.publish("plain", b"")
    with anyio.fail_after(5):
        await done.wait()
    assert "not a request" in str(errors[0])


async def test_buses_with_different_prefixes_do_not_see_each_other(nats_url, open_bus):
    fleet_a = await open_bus(nats_url, nats_subject_prefix="fleet.a")
    fleet_b = await open_bus(nats_url, nats_subject_prefix="fleet.b")
    inbox_a, inbox_b = Inbox(), Inbox()
    await fleet_a.subscribe("events.>", inbox_a)
    await fleet_b.subscribe("events.>", inbox_b)

    await fleet_b.publish("events.admit", b"from b")
    await fleet_a.publish("events.admit", b"from a")
    assert await inbox_a.wait_for(1) == [("events.admit", b"from a")]
    assert await inbox_b.wait_for(1) == [("events.admit", b"from b")]

    async def answer(message: Message) -> None:
        await message.respond(b"b")

    await fleet_b.subscribe("cmd.ping", answer)
    with pytest.raises(NoResponders):
        await fleet_a.request("cmd.ping", b"", timeout=5)  # fleet b's responder is invisible


async def test_prefix_is_put_in_front_of_every_subject_on_the_server(nats_url, open_bus):
    raw = await open_bus(nats_url, nats_subject_prefix="")  # sees absolute subjects
    inbox = Inbox()
    await raw.subscribe("prod.>", inbox)
    bus = await open_bus(nats_url, nats_subject_prefix="prod.lmcache")
    await bus.publish("kv.admit", b"1")
    assert await inbox.wait_for(1) == [("prod.lmcache.kv.admit", b"1")]


async def test_unsubscribe_stops_delivery_and_may_repeat(nats_url, open_bus):
    bus = await open_bus(nats_url)
    inbox, witness = Inbox(), Inbox()
    sub = await bus.subscribe("t", inbox)
    await bus.subscribe("t", witness)
    await sub.unsubscribe()
    await sub.unsubscribe()
    await bus.publish("t", b"after")
    await witness.wait_for(1)
    await bus.flush()
    assert inbox.messages == []


async def test_aclose_delivers_buffered_publishes_and_is_idempotent(nats_url, open_bus):
    sub = await open_bus(nats_url)
    inbox = Inbox()
    await sub.subscribe("t", inbox)
    pub = await open_bus(nats_url)
    for i in range(100):
        await pub.publish("t", bytes([i]))
    await pub.aclose()
    await pub.aclose()
    assert len(await inbox.wait_for(100)) == 100
    assert not pub.is_connected
    with pytest.raises(TransportError, match="closed"):
        await pub.publish("t", b"late")


async def test_publish_larger_than_server_max_payload_raises_transport_error(nats_url, open_bus):
    bus = await open_bus(nats_url)
    with pytest.raises(TransportError, match="max_payload"):
        await bus.publish("big", b"x" * (bus.client.max_payload + 1))


async def test_flush_returns_after_the_server_routed_every_earlier_publish(nats_url, open_bus):
    sub = await open_bus(nats_url)
    inbox = Inbox()
    await sub.subscribe("burst", inbox)
    pub = await open_bus(nats_url)
    for round_number in range(20):
        for i in range(50):
            await pub.publish("burst", bytes([i]))
        await pub.flush()
        # routed before flush() returned, so the subscriber's own barrier comes after them
        await sub.flush()
        assert len(inbox.messages) == 50 * (round_number + 1)


async def test_flush_on_a_closed_bus_raises_transport_error(nats_url, open_bus):
    bus = await open_bus(nats_url)
    await bus.aclose()
    with pytest.raises(TransportError, match="closed"):
        await bus.flush()


async def test_pending_counts_what_was_received_and_not_yet_handled(nats_url, open_bus):
    pub = await open_bus(nats_url)
    sub = await open_bus(nats_url)
    release, started = anyio.Event(), anyio.Event()
    handled: list[bytes] = []

    async def slow(message: Message) -> None:
        started.set()
        await release.wait()
        handled.append(message.payload)

    subscription = await sub.subscribe("kv.backlog", slow)
    for payload in (b"1", b"2", b"3"):
        await pub.publish("kv.backlog", payload)
    await pub.flush()
    with anyio.fail_after(5):
        await started.wait()
    await sub.flush()  # everything sent before is now in the subscription's queue
    assert subscription.pending() == 2  # the first is in the handler
    release.set()
    with anyio.fail_after(5):
        while len(handled) < 3:
            await anyio.sleep(0.01)  # poll interval of a deadline-bounded poll
    assert subscription.pending() == 0
    await subscription.unsubscribe()
    assert subscription.pending() == 0
