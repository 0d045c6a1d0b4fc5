"""Connecting: URL forms, server lists, auth against a real nats-server, and clear failures."""

from __future__ import annotations

import anyio
import pytest

from lmcache_core.config import LMCacheSettings
from lmcache_core.errors import TransportError
from lmcache_core.testing import free_port, running_nats_server
from lmcache_transport_nats import NatsSettings, connect

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("form", ["{host}:{port}", "nats://{host}:{port}"])
async def test_connect_accepts_host_port_and_nats_urls(nats_server, open_bus, form):
    bus = await open_bus(form.format(host="127.0.0.1", port=nats_server.port))
    assert bus.is_connected
    assert bus.servers == [nats_server.url]


async def test_nats_servers_setting_wins_over_the_url_argument(nats_url, open_bus):
    dead = f"127.0.0.1:{free_port()}"
    bus = await open_bus(dead, nats_servers=[nats_url])
    assert bus.is_connected
    assert bus.servers == [nats_url]


async def test_connect_without_url_uses_controller_url_of_the_settings(nats_server):
    settings = LMCacheSettings(controller_url=f"127.0.0.1:{nats_server.port}")
    bus = await connect(settings, None)
    async with bus:
        assert bus.is_connected
        assert bus.prefix == "lmcache"  # NatsSettings defaults apply without the plugin's keys


async def test_connect_without_any_url_names_the_keys_to_set():
    with pytest.raises(TransportError, match="controller_url.*nats_servers"):
        await connect(LMCacheSettings(), None)


async def test_unreachable_url_fails_within_the_connect_timeout_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    start = anyio.current_time()
    with pytest.raises(TransportError) as info:
        await connect(NatsSettings(nats_connect_timeout=0.5), url)
    assert anyio.current_time() - start < 3
    message = str(info.value)
    assert url in message
    assert "nats-server runs there" in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [("http://127.0.0.1:4222", "scheme"), ("nats://:4222", "no host"), ("127.0.0.1:port", "port")],
)
async def test_malformed_url_fails_at_once_naming_the_problem(url, problem):
    with pytest.raises(TransportError, match=problem):
        await connect(NatsSettings(), url)


async def test_user_and_password_auth_connects_with_right_credentials_only(open_bus):
    with running_nats_server(user="alice", password="s3cret") as server:
        bus = await open_bus(server.url, nats_user="alice", nats_password="s3cret")
        assert await _echo_roundtrip(bus)

        start = anyio.current_time()
        with pytest.raises(TransportError, match="refused.*nats_user") as info:
            await connect(NatsSettings(nats_user="alice", nats_password="wrong"), server.url)
        assert anyio.current_time() - start < 1.5  # an auth error is not retried
        assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
        with pytest.raises(TransportError, match="refused"):
            await connect(NatsSettings(), server.url)
        await bus.aclose()


async def test_token_auth_connects_with_right_token_only(open_bus):
    with running_nats_server(token="t0ken") as server:
        bus = await open_bus(server.url, nats_token="t0ken")
        assert await _echo_roundtrip(bus)
        with pytest.raises(TransportError, match="refused.*nats_token"):
            await connect(NatsSettings(nats_token="other"), server.url)
        await bus.aclose()


async def test_password_without_user_is_rejected_before_dialing(nats_url):
    with pytest.raises(TransportError, match="nats_user"):
        await connect(NatsSettings(nats_password="x"), nats_url)


async def _echo_roundtrip(bus) -> bool:
    async def echo(message) -> None:
        await message.respond(message.payload)

    await bus.subscribe("echo", echo)
    return await bus.request("echo", b"ping", timeout=5) == b"ping"
