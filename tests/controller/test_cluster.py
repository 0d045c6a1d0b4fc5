"""Redundant controllers on a three-node NATS cluster: both hold the whole index and answer
alike, a clear through either reaches both, and losing a node or a controller loses nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from lmcache_transport_nats import NatsCluster

from .support import (
    PROMPT,
    ControllerProcess,
    ControllerRunner,
    Instance,
    controller_settings,
    indexed_chunks,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

#: every client tries its servers in the order given (so the test knows which node each uses)
#: and redials quickly after losing one
CLUSTER_CLIENT = {"nats_randomize_servers": False, "nats_reconnect_wait": 0.05}
CLUSTER_ENV = {f"LMCACHE_{key.upper()}": str(value).lower() for key, value in CLUSTER_CLIENT.items()}
OTHER = list(range(500, 540))  # a prompt no test stores before the node dies


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3) as running:
        yield running


def _inventories(*instances: Instance) -> dict[tuple[str, int, str], int]:
    out: dict[tuple[str, int, str], int] = {}
    for instance in instances:
        out.update(instance.inventory_counts())
    return out


def _converged(views: dict[str, Any], truth: dict[tuple[str, int, str], int]) -> bool:
    """Whether every controller's index credits exactly what the workers hold."""
    return all(indexed_chunks(client) == truth for client in views.values())


def test_two_controllers_on_a_nats_cluster_answer_alike_and_survive_losing_a_node_and_a_controller(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    n0, n1, n2 = cluster.urls
    with ExitStack() as stack:
        # controller A on node 0 (a process, so it can be killed), B on node 2; workers on 0 and 1
        a = stack.enter_context(ControllerProcess(f"{n0},{n1}", env=CLUSTER_ENV))
        b = stack.enter_context(ControllerRunner(f"{n2},{n1}", settings=controller_settings(**CLUSTER_CLIENT)))
        w1 = Instance(f"{n0},{n2}", "inst-1", tmp_path / "disk-1", **CLUSTER_CLIENT)
        stack.callback(w1.close)
        w2 = Instance(f"{n1},{n2}", "inst-2", tmp_path / "disk-2", **CLUSTER_CLIENT)
        stack.callback(w2.close)
        assert b.handle is not None and b.handle.controller.bus.client.connected_url.port == cluster.nodes[2].port

        w1.store(PROMPT)
        w2.store(PROMPT[:8])
        expected = {"inst-1": ["LocalCPUBackend", 12], "inst-2": ["LocalCPUBackend", 8]}
        wait_for(lambda: a.lookup(PROMPT) == expected and b.lookup(PROMPT) == expected, what="both credit both")
        views = {"A": a.client, "B": b.client}
        wait_for(lambda: _converged(views, _inventories(w1, w2)), what="both indexes equal the inventories")

        # a clear through A is carried out by the worker; its CLEAR event reaches B too
        cleared = a.client.post("/clear", json={"instance_id": "inst-1", "location": "LocalCPUBackend"})
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["num_tokens"] == 12
        after = {"inst-1": ["LocalDiskBackend", 12], "inst-2": ["LocalCPUBackend", 8]}
        wait_for(lambda: a.lookup(PROMPT) == after and b.lookup(PROMPT) == after, what="A's clear seen by both")
        # and one through B reaches A
        assert b.client.post("/clear", json={"instance_id": "inst-2", "location": "LocalDiskBackend"}).status_code == 200
        wait_for(lambda: _converged(views, _inventories(w1, w2)), what="B's clear seen by both")

        # the node under A (and w1) dies: both fail over to another node and keep up
        cluster.stop_node(0, kill=True)
        w1.store(OTHER)
        w2.store(OTHER[:20])
        moved = {"inst-1": ["LocalCPUBackend", 40], "inst-2": ["LocalCPUBackend", 20]}
        wait_for(lambda: a.lookup(OTHER) == moved and b.lookup(OTHER) == moved, what="both see events after the node died")
        wait_for(lambda: _converged(views, _inventories(w1, w2)), what="indexes equal after the fail-over")

        # A itself dies: B keeps answering, and loses nothing stored meanwhile
        a.kill()
        w2.store(OTHER[:32], seed=3)
        assert b.lookup(PROMPT) == after
        wait_for(lambda: _converged({"B": b.client}, _inventories(w1, w2)), what="B alone keeps up")

        # A restarts (node 0 is still down, so on node 1) and converges to B's index
        a.close()
        a = stack.enter_context(ControllerProcess(f"{n0},{n1}", env=CLUSTER_ENV))
        views["A"] = a.client
        # its hello makes every worker register again, and it pulls their inventories; B keeps answering meanwhile
        assert b.lookup(PROMPT) == after
        wait_for(lambda: _converged(views, _inventories(w1, w2)), timeout=15, what="the restarted A converges")
        assert a.lookup(OTHER) == b.lookup(OTHER)
        assert a.lookup(PROMPT) == b.lookup(PROMPT) == after
