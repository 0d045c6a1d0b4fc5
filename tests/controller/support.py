"""Helpers of the controller's system tests: a controller on its own event-loop thread, instance
processes, in-process engines with real workers, and polling with a deadline (never a sleep)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
from anyio.from_thread import start_blocking_portal

from lmcache_core.config import LMCacheSettings, load_settings
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.controller.server import ControllerHandle, running_controller
from lmcache_core.controller.state import Controller
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import LMCacheError
from lmcache_core.plugins import get_plugin_manager, resolve_transport
from lmcache_core.testing import FaultyBus, FaultPlan
from lmcache_core.transport import Message
from lmcache_core.wire import EventBatch, Heartbeat
from lmcache_core.worker import WorkerHandle, start_worker

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"
WAIT = 20.0  # generous deadline on a shared 2-core machine; tests go on as soon as they can
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 1.0

#: settings every test controller and instance uses: fast heartbeats, short command timeout
FAST = {
    "worker_heartbeat_interval": HEARTBEAT_INTERVAL,
    "controller_heartbeat_timeout": HEARTBEAT_TIMEOUT,
    "controller_command_timeout": 2.0,
}


def wait_for(predicate: Callable[[], T], timeout: float = WAIT, what: str = "condition", every: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(every)  # the poll interval of a deadline-bounded poll


def controller_settings(**overrides: Any) -> LMCacheSettings:
    return load_settings(get_plugin_manager(), config_file=None, **{**FAST, **overrides})


class ControllerRunner:
    """A real controller (HTTP on a free loopback port, a real bus) on its own event-loop thread."""

    def __init__(self, nats_url: str, settings: LMCacheSettings | None = None, **kwargs: Any) -> None:
        self.nats_url = nats_url
        self.settings = settings if settings is not None else controller_settings()
        self.kwargs = kwargs
        self._stack: ExitStack | None = None
        self.handle: ControllerHandle | None = None

    def start(self) -> "ControllerRunner":
        stack = ExitStack()
        try:
            self.portal = stack.enter_context(start_blocking_portal())
            self.handle = stack.enter_context(
                self.portal.wrap_async_context_manager(
                    running_controller(self.settings, host="127.0.0.1", port=0, nats_url=self.nats_url, **self.kwargs)
                )
            )
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        stack.callback(self.client.close)
        return self

    def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @property
    def url(self) -> str:
        assert self.handle is not None
        return self.handle.url

    @property
    def controller(self) -> Controller:
        assert self.handle is not None
        return self.handle.controller

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the controller's event loop (its state is not thread-safe)."""
        return self.portal.call(fn, *args)

    def lookup(self, tokens: list[int], **extra: Any) -> dict[str, list[Any]]:
        response = self.client.post("/lookup", json={"tokens": tokens, **extra})
        assert response.status_code == 200, response.text
        return response.json()["layout_info"]

    def holder_counts(self) -> dict[tuple[str, int, str], int]:
        """Chunks the index credits per (instance, rank, location), for live workers."""

        def read() -> dict[tuple[str, int, str], int]:
            out = {}
            for worker in self.controller.workers.values():
                for name, loc in worker.locations.items():
                    out[(worker.instance_id, worker.worker_id, name)] = self.controller.index.holder_stats(loc.holder)[0]
            return out

        return self.call(read)

    def __enter__(self) -> "ControllerRunner":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BusCounter:
    """Counts every message under the bus prefix by topic; keeps event batches and heartbeats."""

    def __init__(self) -> None:
        self.topics: Counter[str] = Counter()
        self.resets: Counter[str] = Counter()  # reset batches per topic
        self.beats: Counter[str] = Counter()  # heartbeats per epoch
        self.last_beat: dict[str, Heartbeat] = {}  # the latest heartbeat per topic
        self._lock = threading.Lock()

    async def __call__(self, msg: Message) -> None:
        with self._lock:
            self.topics[msg.topic] += 1
            if msg.topic.startswith("events."):
                if EventBatch.decode(msg.payload).reset:
                    self.resets[msg.topic] += 1
            elif msg.topic.startswith("heartbeat."):
                beat = Heartbeat.decode(msg.payload)
                self.beats[beat.epoch] += 1
                self.last_beat[msg.topic] = beat

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(n for topic, n in self.topics.items() if topic == prefix or topic.startswith(prefix + "."))


@contextmanager
def counting(nats_url: str) -> Iterator[BusCounter]:
    """A ``BusCounter`` listening on the test's bus for the block."""
    counter = BusCounter()
    settings = controller_settings()
    with start_blocking_portal() as portal:
        bus = portal.call(resolve_transport(get_plugin_manager(), "nats").connect, settings, nats_url)
        try:
            portal.call(bus.subscribe, ">", counter)
            portal.call(bus.flush)
            yield counter
            portal.call(bus.flush)
        finally:
            portal.call(bus.aclose)


def kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic KV ``[2 layers, 2, tokens, 8]`` bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, num_tokens, 8, generator=gen).to(torch.bfloat16)


class Instance:
    """A real cache engine (CPU + disk) with a real worker reporting to the controller's bus."""

    def __init__(
        self, nats_url: str, instance_id: str, disk: Path, *, chunk_size: int = 4,
        worker_id: int = 0, world_size: int = 1, model: str = "demo-model", **settings: Any,
    ) -> None:
        disk.mkdir(parents=True, exist_ok=True)
        self.settings = load_settings(
            get_plugin_manager(),
            config_file=None,
            **FAST,
            chunk_size=chunk_size,
            local_cpu=True,
            max_local_cpu_size=0.02,
            local_disk=str(disk),
            max_local_disk_size=0.05,
            enable_controller=True,
            controller_url=nats_url,
            lmcache_instance_id=instance_id,
            **settings,
        )
        self.engine = CacheEngine(
            self.settings, EngineMetadata(model, world_size=world_size, worker_id=worker_id), start_worker=False
        )
        self.worker: WorkerHandle = start_worker(self.engine)
        self.instance_id = instance_id
        self.worker_id = worker_id

    def store(self, tokens: list[int], seed: int = 0) -> int:
        stored = self.engine.store(tokens, kv(len(tokens), seed))
        self.engine.flush(10.0)
        return stored

    def sync(self) -> None:
        assert self.worker.wait_registered(WAIT), f"{self.instance_id} never registered"
        assert self.worker.sync(WAIT), f"{self.instance_id} could not publish its events"

    def inject_faults(self, plan: FaultPlan) -> FaultyBus:
        """Put a ``FaultyBus`` between this worker and its bus (until it reconnects)."""
        worker = self.worker

        def wrap() -> FaultyBus:
            assert worker._bus is not None, "the worker is not connected"
            worker._bus = faulty = FaultyBus(worker._bus, plan)
            return faulty

        return self.on_worker_loop(wrap)

    def on_worker_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (a function or a coroutine function) on the worker's event loop."""
        assert self.worker._portal is not None
        return self.worker._portal.call(fn, *args)

    def inventory_counts(self) -> dict[tuple[str, int, str], int]:
        return {
            (self.instance_id, self.worker_id, loc): len(chunks) for loc, chunks in self.engine.inventory().items()
        }

    def close(self) -> None:
        self.worker.close()
        self.engine.close()


def child_env() -> dict[str, str]:
    """The environment of a process a test starts: this one's without its ``LMCACHE_*``
    settings, plus the test settings (``FAST``) and the plugin selection, if any."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update({f"LMCACHE_{k.upper()}": str(v) for k, v in FAST.items()})
    for name in ("LMCACHE_PLUGINS", "LMCACHE_DISABLE_PLUGINS"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def two_ranks(make_instance: Callable[..., Instance], instance_id: str, tokens0: list[int],
              tokens1: list[int]) -> tuple[Instance, Instance]:
    """Ranks 0 and 1 of a tensor-parallel instance (``make_instance`` of conftest), holding
    ``tokens0`` and ``tokens1``, their events published."""
    ranks = (make_instance(instance_id, worker_id=0, world_size=2), make_instance(instance_id, worker_id=1, world_size=2))
    for rank, tokens in zip(ranks, (tokens0, tokens1)):
        rank.store(tokens)
        rank.sync()
    return ranks


class InstanceProcess:
    """``examples/instance.py`` as a real process; ``ready`` is its JSON ready line."""

    def __init__(self, nats_url: str, tmp: Path, *, instance_id: str = INSTANCE, args: list[str] = (), disk: bool = True,
                 config_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        full_env = child_env()
        full_env.update(
            LMCACHE_ENABLE_CONTROLLER="true",
            LMCACHE_CONTROLLER_URL=nats_url,
            LMCACHE_LMCACHE_INSTANCE_ID=instance_id,
            LMCACHE_MAX_LOCAL_CPU_SIZE="0.05",
        )
        if config_file is not None:
            full_env["LMCACHE_CONFIG_FILE"] = str(config_file)
        if disk:
            (tmp / "disk").mkdir(parents=True, exist_ok=True)
            full_env.update(LMCACHE_LOCAL_DISK=str(tmp / "disk"), LMCACHE_MAX_LOCAL_DISK_SIZE="0.1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "instance.py"), *args],
            stdin=subprocess.PIPE if "--control" in args else None,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=tmp,
        )
        self.ready = read_json_line(self.proc, "ready", "instance.py")

    def control(self, op: str, tokens: list[int] | None = None) -> dict[str, Any]:
        """Send one ``--control`` request (``examples/instance.py``) and read its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None, "start it with args=['--control']"
        self.proc.stdin.write(json.dumps({"op": op, "tokens": tokens or []}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or "{}")
        assert "error" not in answer and answer, f"instance.py answered {answer!r} to {op}"
        return answer

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM ``proc`` (SIGKILL after ``timeout`` seconds), wait for it and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def read_json_line(proc: subprocess.Popen, key: str, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """The process's JSON ready line (``key`` is always ``"ready"``); a test failure otherwise."""
    assert key == "ready"
    try:
        return read_ready_line(proc, what, timeout)
    except LMCacheError as exc:
        raise AssertionError(str(exc)) from None


def indexed_chunks(client: httpx.Client) -> dict[tuple[str, int, str], int]:
    """Chunks a controller credits per (instance, rank, location), read from its ``/instances``."""
    response = client.get("/instances")
    assert response.status_code == 200, response.text
    return {
        (worker["instance_id"], worker["worker_id"], name): location["chunks"]
        for instance in response.json()["instances"]
        for worker in instance["workers"]
        for name, location in worker["locations"].items()
    }


class ControllerProcess:
    """``lmcache_controller --nats-url URLS`` as a real process (HTTP on a free loopback port);
    ``kill()`` ends it like a crash. ``env`` adds ``LMCACHE_*`` settings to the test ones."""

    def __init__(self, nats_url: str, env: dict[str, str] | None = None) -> None:
        full_env = {**child_env(), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
             "--nats-url", nats_url, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        )
        self.ready = read_json_line(self.proc, "ready", "lmcache_controller")
        self.client = httpx.Client(base_url=self.ready["http"], timeout=30.0)

    def lookup(self, tokens: list[int]) -> dict[str, list[Any]]:
        response = self.client.post("/lookup", json={"tokens": tokens})
        assert response.status_code == 200, response.text
        return response.json()["layout_info"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        self.client.close()
        stop_process(self.proc)

    def __enter__(self) -> "ControllerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metric(controller: Any, name: str, *labels: str) -> float:
    """The value of one of a controller's Prometheus counters (with ``labels`` when it has some)."""
    counter = getattr(controller.metrics, name)
    return (counter.labels(*labels) if labels else counter)._value.get()
