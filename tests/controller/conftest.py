"""Fixtures of the controller's system tests (real nats-server, controller, instances)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ControllerRunner, Instance


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)


@pytest.fixture
def controller(nats_url: str) -> Iterator[ControllerRunner]:
    """A controller on a free port, using the test's nats-server."""
    with ControllerRunner(nats_url) as runner:
        yield runner


@pytest.fixture
def make_instance(nats_url: str, tmp_path: Path) -> Iterator:
    """Builds in-process instances (real engine + worker); all closed after the test."""
    made: list[Instance] = []

    def make(instance_id: str, **kwargs) -> Instance:
        inst = Instance(nats_url, instance_id, tmp_path / f"disk-{instance_id}-{kwargs.get('worker_id', 0)}", **kwargs)
        made.append(inst)
        return inst

    yield make
    for inst in reversed(made):
        inst.close()
