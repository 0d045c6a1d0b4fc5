"""Fixtures of the NATS transport tests; the ``nats_server``/``nats_url`` fixtures come from
``lmcache_core.testing`` (a pytest plugin every lmcache plugin gets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from lmcache_transport_nats import NatsBus, NatsSettings, connect

BusFactory = Callable[..., Awaitable[NatsBus]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


@pytest.fixture
async def open_bus(anyio_backend: str) -> AsyncIterator[BusFactory]:
    """``await open_bus(url, **nats_settings)``: a connected bus, closed after the test."""
    buses: list[NatsBus] = []

    async def factory(url: str | None, **settings: Any) -> NatsBus:
        bus = await connect(NatsSettings(**settings), url)
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        await bus.aclose()
