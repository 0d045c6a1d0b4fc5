"""A three-node NATS cluster: messages cross the routes, and a client fails over when its node dies."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from lmcache_core.transport import Message
from lmcache_transport_nats import NatsCluster
from lmcache_transport_nats.bus import server_urls
from lmcache_transport_nats.settings import NatsSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3) as running:
        yield running


def test_a_comma_separated_url_names_several_servers() -> None:
    assert server_urls(NatsSettings(), "a:1, nats://b:2,tls://c:3") == [
        "nats://a:1", "nats://b:2", "tls://c:3",
    ]  # fmt: skip


def test_nats_servers_accepts_comma_separated_text() -> None:
    settings = NatsSettings.model_validate({"nats_servers": "n1:4222, n2:4222"})
    assert settings.nats_servers == ["n1:4222", "n2:4222"]


async def test_a_message_published_on_one_node_reaches_a_subscriber_on_another(cluster, open_bus) -> None:
    subscriber = await open_bus(cluster.urls[0])
    publisher = await open_bus(cluster.urls[2])
    got = anyio.Event()
    received: list[bytes] = []

    async def collect(message: Message) -> None:
        received.append(message.payload)
        got.set()

    await subscriber.subscribe("events.x", collect)
    with anyio.fail_after(10):
        while not got.is_set():  # the subscription reaches node 2 through the route shortly after
            await publisher.publish("events.x", b"across")
            await publisher.flush()
            with anyio.move_on_after(0.1):
                await got.wait()
    assert received[0] == b"across"


async def test_a_client_fails_over_to_another_node_when_its_node_is_killed(cluster, open_bus) -> None:
    first, second, third = cluster.urls
    bus = await open_bus(f"{first},{second}", nats_randomize_servers=False, nats_reconnect_wait=0.05)
    assert bus.client.connected_url is not None
    assert bus.client.connected_url.netloc == first.removeprefix("nats://")
    back = anyio.Event()

    async def reconnected() -> None:
        back.set()

    bus.on_reconnect(reconnected)
    listener = await open_bus(third)
    heard = anyio.Event()

    async def note(message: Message) -> None:
        heard.set()

    await listener.subscribe("after.failover", note)
    cluster.stop_node(0, kill=True)
    with anyio.fail_after(10):
        await back.wait()
    assert bus.client.connected_url.netloc != first.removeprefix("nats://")
    with anyio.fail_after(10):
        while not heard.is_set():
            await bus.publish("after.failover", b"still here")
            with anyio.move_on_after(0.1):
                await heard.wait()
