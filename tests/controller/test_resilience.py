"""Failures the controller survives: a killed instance, a restarted controller, a restarted nats-server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .support import HEARTBEAT_TIMEOUT, INSTANCE, PROMPT, ControllerRunner, InstanceProcess, wait_for

pytestmark = pytest.mark.timeout(180)


def test_a_killed_instance_leaves_the_index_within_the_heartbeat_timeout(
    controller: ControllerRunner, nats_url: str, tmp_path: Path
) -> None:
    instance = InstanceProcess(nats_url, tmp_path)
    try:
        wait_for(lambda: controller.lookup(PROMPT) == {INSTANCE: ["LocalCPUBackend", 12]}, what="credited")
        instance.kill()  # SIGKILL: no goodbye, heartbeats just stop
        instance.proc.wait(10)
        killed = time.monotonic()
        wait_for(lambda: controller.lookup(PROMPT) == {}, timeout=HEARTBEAT_TIMEOUT + 10, what="entries removed")
        elapsed = time.monotonic() - killed
        # the timeout counts from the last heartbeat (<= one interval before the kill) plus one check period
        assert elapsed <= HEARTBEAT_TIMEOUT + 1.0, elapsed
        assert controller.client.get("/instances").json() == {"instances": []}
        assert controller.call(controller.controller.index.num_entries) == 0
    finally:
        instance.close()


def test_a_restarted_controller_recovers_the_index_from_the_workers_within_seconds(
    nats_url: str, make_instance
) -> None:
    a, b = make_instance("inst-a"), make_instance("inst-b")
    a.store(PROMPT)
    b.store(PROMPT[:8])
    expected = {"inst-a": ["LocalCPUBackend", 12], "inst-b": ["LocalCPUBackend", 8]}
    with ControllerRunner(nats_url) as first:
        wait_for(lambda: first.lookup(PROMPT) == expected, what="first controller credits both")
    a.store(PROMPT + [1, 2, 3, 4])  # stored while no controller runs
    with ControllerRunner(nats_url) as second:
        started = time.monotonic()
        wait_for(lambda: second.lookup(PROMPT) == expected, timeout=10, what="second controller recovered")
        assert time.monotonic() - started < 5.0
        wait_for(lambda: second.holder_counts() == {**a.inventory_counts(), **b.inventory_counts()},
                 what="index equals the workers' inventories")


def test_after_a_nats_server_restart_everything_reconnects_and_the_index_converges(
    nats_server, make_instance
) -> None:
    a, b = make_instance("inst-a"), make_instance("inst-b")
    a.store(PROMPT)
    with ControllerRunner(nats_server.url) as runner:
        wait_for(lambda: runner.lookup(PROMPT) == {"inst-a": ["LocalCPUBackend", 12]}, what="credited")
        nats_server.stop()
        # events while the broker is down: buffered or lost, they must not stay missing
        b.store(PROMPT)
        a.engine.clear("LocalDiskBackend")
        a.store(list(range(100, 140)))
        nats_server.start()
        expected = {"inst-a": ["LocalCPUBackend", 12], "inst-b": ["LocalCPUBackend", 12]}
        wait_for(lambda: runner.lookup(PROMPT) == expected, what="both credited after the restart")
        wait_for(lambda: runner.holder_counts() == {**a.inventory_counts(), **b.inventory_counts()},
                 what="index equals the workers' inventories")
        assert a.worker.connected and b.worker.connected
