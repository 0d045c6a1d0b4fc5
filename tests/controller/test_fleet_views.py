"""``/query_instance``, ``/query_worker_info`` with ``"all"``, ``GET /controller/workers`` and
``GET /controller/key-stats`` over real workers on a real nats-server."""

from __future__ import annotations

from typing import Any

import pytest

from .support import PROMPT, ControllerRunner, wait_for

pytestmark = pytest.mark.timeout(120)

LMCACHE_WORKER_FIELDS = {
    "instance_id", "worker_id", "ip", "port", "peer_init_url", "registration_time", "last_heartbeat_time",
}


@pytest.fixture
def fleet(controller: ControllerRunner, make_instance) -> ControllerRunner:
    """inst-a (two ranks, LMCache's port settings) holds the prompt; inst-b holds its first chunk."""
    ports = {"lmcache_worker_ports": [8500, 8501], "p2p_host": "10.1.2.3", "p2p_init_ports": [8200, 8201]}
    a0 = make_instance("inst-a", worker_id=0, world_size=2, **ports)
    a1 = make_instance("inst-a", worker_id=1, world_size=2, **ports)
    b = make_instance("inst-b")
    for inst, tokens in ((a0, PROMPT), (a1, PROMPT), (b, PROMPT[:4])):
        inst.store(tokens)
        inst.sync()
    wait_for(
        lambda: controller.lookup(PROMPT) == {"inst-a": ["LocalCPUBackend", 12], "inst-b": ["LocalCPUBackend", 4]},
        what="both instances credited",
    )
    return controller


def _get(controller: ControllerRunner, path: str, status: int = 200, **params: Any) -> Any:
    response = controller.client.get(path, params=params)
    assert response.status_code == status, response.text
    return response.json()


def test_query_instance_finds_instances_by_the_ip_their_workers_registered(fleet: ControllerRunner) -> None:
    client = fleet.client
    # the workers reach the bus over loopback, so that is the address they report
    found = client.post("/query_instance", json={"ip": "127.0.0.1", "event_id": "sent-by-lmcache-clients"}).json()
    assert found["res"] == "inst-a" and found["instance_ids"] == ["inst-a", "inst-b"]
    status = client.post("/check_finish", json={"event_id": found["event_id"]}).json()
    assert (status["status"], status["kind"]) == ("finished", "query_instance")
    missing = client.post("/query_instance", json={"ip": "10.9.9.9"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no instance has ip '10.9.9.9'; registered ips: 127.0.0.1"}


def test_query_worker_info_all_reports_lmcache_fields_beside_ours(fleet: ControllerRunner) -> None:
    client = fleet.client
    infos = client.post("/query_worker_info", json={"instance_id": "all"}).json()["worker_infos"]
    assert [(w["instance_id"], w["worker_id"]) for w in infos] == [("inst-a", 0), ("inst-a", 1), ("inst-b", 0)]
    for info in infos:
        assert LMCACHE_WORKER_FIELDS | {"locations", "hashing", "host", "pid"} <= set(info)
        assert info["ip"] == "127.0.0.1" and info["registration_time"] > 0
    # p2p_host and p2p_init_ports are set, but without enable_p2p nothing serves there: no peer_init_url
    assert [(w["port"], w["peer_init_url"]) for w in infos] == [(8500, None), (8501, None), (0, None)]
    # LMCache's page asks with worker_ids []: every rank
    every = client.post("/query_worker_info", json={"instance_id": "all", "worker_ids": []}).json()["worker_infos"]
    assert [(w["instance_id"], w["worker_id"], w["epoch"]) for w in every] == [
        (w["instance_id"], w["worker_id"], w["epoch"]) for w in infos
    ]
    rank1 = client.post("/query_worker_info", json={"instance_id": "all", "worker_ids": [1]}).json()["worker_infos"]
    assert [(w["instance_id"], w["worker_id"]) for w in rank1] == [("inst-a", 1)]


def test_controller_workers_lists_workers_with_their_key_counts(fleet: ControllerRunner) -> None:
    listed = _get(fleet, "/controller/workers")
    assert listed["total_count"] == 3
    workers = {(w["instance_id"], w["worker_id"]): w for w in listed["workers"]}
    assert set(workers["inst-a", 0]) == LMCACHE_WORKER_FIELDS | {"key_count"}
    # 3 chunks on CPU and 3 on disk per rank of inst-a; 1 + 1 for inst-b
    assert {key: w["key_count"] for key, w in workers.items()} == {("inst-a", 0): 6, ("inst-a", 1): 6, ("inst-b", 0): 2}
    one_instance = _get(fleet, "/controller/workers", instance_id="inst-b")
    assert one_instance["total_count"] == 1
    assert [(w["instance_id"], w["key_count"]) for w in one_instance["workers"]] == [("inst-b", 2)]
    # both given: that worker alone, as LMCache answers
    one = _get(fleet, "/controller/workers", instance_id="inst-a", worker_id=1)
    assert (one["instance_id"], one["worker_id"], one["key_count"], one["port"]) == ("inst-a", 1, 6, 8501)
    assert _get(fleet, "/controller/workers", 404, instance_id="nope")["detail"].startswith("unknown instance 'nope'")
    assert "has no worker 7" in _get(fleet, "/controller/workers", 404, instance_id="inst-a", worker_id=7)["detail"]
    assert _get(fleet, "/controller/workers", 422, worker_id=-1)["detail"][0]["loc"] == ["query", "worker_id"]
    by_rank = _get(fleet, "/controller/workers", worker_id=1)
    assert [(w["instance_id"], w["worker_id"]) for w in by_rank["workers"]] == [("inst-a", 1)]


def test_key_stats_count_keys_and_workers_per_instance(fleet: ControllerRunner) -> None:
    stats = _get(fleet, "/controller/key-stats")
    assert stats == {
        "total_key_count": 14,
        "total_instance_count": 2,
        "total_worker_count": 3,
        "instances": [
            {"instance_id": "inst-a", "key_count": 12, "worker_count": 2},
            {"instance_id": "inst-b", "key_count": 2, "worker_count": 1},
        ],
    }
    fleet.client.post("/clear", json={"instance_id": "inst-a", "location": "LocalCPUBackend"})
    assert _get(fleet, "/controller/key-stats")["instances"][0]["key_count"] == 6


def test_views_of_an_empty_fleet(controller: ControllerRunner) -> None:
    assert _get(controller, "/controller/workers") == {"workers": [], "total_count": 0}
    assert _get(controller, "/controller/key-stats") == {
        "total_key_count": 0, "total_instance_count": 0, "total_worker_count": 0, "instances": [],
    }
    assert controller.client.post("/query_worker_info", json={"instance_id": "all"}).json()["worker_infos"] == []
    missing = controller.client.post("/query_instance", json={"ip": "127.0.0.1"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no instance has ip '127.0.0.1'; registered ips: (none registered)"}
