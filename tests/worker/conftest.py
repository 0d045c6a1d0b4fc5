"""Worker test fixtures: a real nats-server, a real engine, a peer playing the controller.

The ``ControllerPeer`` speaks the wire protocol directly on the bus from its own event-loop
thread, so tests stay synchronous and wait on what it records (a condition variable, never a
sleep).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import pytest
import torch
from anyio.from_thread import start_blocking_portal

from lmcache_core.config import LMCacheSettings, load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.plugins import get_plugin_manager, resolve_transport
from lmcache_core.transport import Message, MessageBus
from lmcache_core.wire import (
    EVENTS_WILDCARD,
    HEARTBEAT_WILDCARD,
    REGISTER_WILDCARD,
    Command,
    CommandReply,
    CommandRequest,
    EventBatch,
    Heartbeat,
    RegistrationAck,
    WorkerRegistration,
    command_topic,
)
from lmcache_core.worker import WorkerHandle, start_worker

T = TypeVar("T")

PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"
WAIT = 15.0  # generous deadline on a shared 2-core machine; tests finish as soon as they can


def kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic KV ``[2 layers, 2, tokens, 8]`` bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, num_tokens, 8, generator=gen).to(torch.bfloat16)


class ControllerPeer:
    """Plays the controller's side of the protocol on a real bus and records what workers send."""

    def __init__(
        self, settings: LMCacheSettings, url: str, *, answer_register: bool = True
    ) -> None:
        self.settings = settings
        self.url = url
        self.answer_register = answer_register
        self.registrations: list[WorkerRegistration] = []
        self.batches: list[EventBatch] = []
        self.heartbeats: list[Heartbeat] = []
        self._cond = threading.Condition()
        self._stack = ExitStack()
        self._bus: MessageBus | None = None

    def start(self) -> ControllerPeer:
        self.portal = self._stack.enter_context(start_blocking_portal())
        self.portal.call(self._connect)
        return self

    async def _connect(self) -> None:
        spec = resolve_transport(get_plugin_manager(), self.settings.transport)
        self._bus = await spec.connect(self.settings, self.url)
        if self.answer_register:
            await self._bus.subscribe(REGISTER_WILDCARD, self._on_register)
        await self._bus.subscribe(EVENTS_WILDCARD, self._on_events)
        await self._bus.subscribe(HEARTBEAT_WILDCARD, self._on_heartbeat)
        await self._bus.flush()

    def _record(self, into: list[Any], item: Any) -> None:
        with self._cond:
            into.append(item)
            self._cond.notify_all()

    async def _on_register(self, msg: Message) -> None:
        self._record(self.registrations, WorkerRegistration.decode(msg.payload))
        await msg.respond(RegistrationAck(accepted=True).encode())

    async def _on_events(self, msg: Message) -> None:
        self._record(self.batches, EventBatch.decode(msg.payload))

    async def _on_heartbeat(self, msg: Message) -> None:
        self._record(self.heartbeats, Heartbeat.decode(msg.payload))

    def wait_until(self, probe: Callable[[], T], timeout: float = WAIT, what: str = "") -> T:
        """Wait until ``probe()`` (called under the lock after each message) is truthy."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = probe()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
                self._cond.wait(left)

    def command(
        self, command: Command, instance: str = INSTANCE, worker: int = 0, deadline: float | None = None
    ) -> CommandReply:
        request = CommandRequest(event_id="t", command=command, deadline=deadline)
        return CommandReply.decode(self.request(command_topic(instance, worker), request.encode()))

    def request(self, topic: str, payload: bytes, timeout: float = WAIT) -> bytes:
        assert self._bus is not None
        return self.portal.call(self._bus.request, topic, payload, timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        assert self._bus is not None
        self.portal.call(self._bus.publish, topic, payload)

    def batches_for(self, location: str, epoch: str | None = None) -> list[EventBatch]:
        with self._cond:
            return [b for b in self.batches if b.location == location and epoch in (None, b.epoch)]

    def close(self) -> None:
        if self._bus is not None:
            self.portal.call(self._bus.aclose)
        self._stack.close()


@pytest.fixture
def pm() -> pluggy.PluginManager:
    return get_plugin_manager()


@pytest.fixture
def make_settings(
    pm: pluggy.PluginManager, tmp_path: Path, nats_server: Any
) -> Callable[..., LMCacheSettings]:
    """Settings of a test instance: CPU and disk locations, fast heartbeats, this test's bus."""

    def make(**overrides: Any) -> LMCacheSettings:
        values: dict[str, Any] = dict(
            chunk_size=256,
            local_cpu=True,
            max_local_cpu_size=0.05,
            local_disk=str(tmp_path / "disk"),
            max_local_disk_size=0.05,
            enable_controller=True,
            lmcache_instance_id=INSTANCE,
            controller_url=nats_server.url,
            worker_heartbeat_interval=0.1,
        )
        values.update(overrides)
        return load_settings(pm, config_file=None, **values)

    return make


@pytest.fixture
def peer(
    make_settings: Callable[..., LMCacheSettings], nats_server: Any
) -> Iterator[ControllerPeer]:
    peer = ControllerPeer(make_settings(), nats_server.url).start()
    yield peer
    peer.close()


class Instance:
    """A real engine (CPU + disk) and its worker, closed in reverse order."""

    def __init__(
        self, settings: LMCacheSettings, pm: pluggy.PluginManager, model: str = "test-model"
    ) -> None:
        self.engine = CacheEngine(settings, EngineMetadata(model), pm, start_worker=False)
        self.worker: WorkerHandle | None = None

    def start_worker(self) -> WorkerHandle:
        self.worker = start_worker(self.engine)
        return self.worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.engine.close()


@pytest.fixture
def make_instance(pm: pluggy.PluginManager) -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(settings: LMCacheSettings, **kwargs: Any) -> Instance:
        instance = Instance(settings, pm, **kwargs)
        made.append(instance)
        return instance

    yield make
    for instance in reversed(made):
        instance.close()
