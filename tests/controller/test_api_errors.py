"""The HTTP API's error answers, auth, metrics, OpenAPI and the routes hook."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import APIRouter, Depends

from lmcache_core.controller.deps import get_controller
from lmcache_core.controller.state import Controller
from lmcache_core.hookspecs import hookimpl
from lmcache_core.plugins import get_plugin_manager

from .support import PROMPT, ControllerRunner, controller_settings, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registered(controller: ControllerRunner, make_instance) -> ControllerRunner:
    inst = make_instance("inst-a")
    inst.store(PROMPT)
    inst.sync()
    wait_for(lambda: controller.lookup(PROMPT), what="instance credited")
    return controller


def test_malformed_json_is_a_422(controller: ControllerRunner) -> None:
    response = controller.client.post("/lookup", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_wrong_types_are_a_422_naming_the_field(controller: ControllerRunner) -> None:
    response = controller.client.post("/lookup", json={"tokens": ["a", 2]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tokens", 0]
    response = controller.client.post("/lookup", json={"tokens": [2**64]})
    assert response.status_code == 422
    response = controller.client.post("/clear", json={"instance_id": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "location"]


def test_unknown_instance_is_a_404_naming_the_known_ones(registered: ControllerRunner) -> None:
    for path, body in [
        ("/clear", {"instance_id": "nope", "location": "LocalCPUBackend"}),
        ("/health", {"instance_id": "nope"}),
        ("/query_worker_info", {"instance_id": "nope"}),
    ]:
        response = registered.client.post(path, json=body)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "unknown instance 'nope'; registered instances: inst-a"}
    response = registered.client.post("/query_worker_info", json={"instance_id": "inst-a", "worker_ids": [0, 3]})
    assert response.status_code == 404
    assert "no worker 3" in response.json()["detail"]


def test_unknown_location_is_a_400_listing_the_instances_locations(registered: ControllerRunner) -> None:
    response = registered.client.post("/clear", json={"instance_id": "inst-a", "location": "GPU"})
    assert response.status_code == 400
    assert response.json() == {"detail": "unknown location 'GPU'; available: LocalCPUBackend, LocalDiskBackend"}


def test_too_many_tokens_is_a_413(nats_url: str) -> None:
    with ControllerRunner(nats_url, controller_settings(controller_max_lookup_tokens=16)) as runner:
        response = runner.client.post("/lookup", json={"tokens": list(range(17))})
        assert response.status_code == 413
        assert "controller_max_lookup_tokens (16)" in response.json()["detail"]
        assert runner.client.post("/lookup", json={"tokens": list(range(16))}).status_code == 200


def test_every_endpoint_needs_the_bearer_token_when_one_is_set(nats_url: str) -> None:
    with ControllerRunner(nats_url, controller_settings(controller_api_token="s3cret")) as runner:
        client = runner.client
        for method, path in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/metrics"), ("GET", "/instances"),
                             ("POST", "/lookup"), ("POST", "/clear"), ("POST", "/check_finish"),
                             ("POST", "/pin"), ("POST", "/unpin"), ("POST", "/move"), ("POST", "/query_instance"),
                             ("GET", "/controller/workers"), ("GET", "/controller/key-stats")]:
            response = client.request(method, path, json={"tokens": [1]})
            assert response.status_code == 401, path
            assert response.json() == {"detail": "missing or wrong bearer token"}
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/lookup", json={"tokens": [1]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/lookup", json={"tokens": [1]}, headers=good).status_code == 200
        assert client.get("/openapi.json", headers=good).status_code == 200


def test_check_finish_reports_finished_events_and_404_for_unknown_ids(registered: ControllerRunner) -> None:
    client = registered.client
    cleared = client.post("/clear", json={"instance_id": "inst-a", "location": "LocalCPUBackend"}).json()
    status = client.post("/check_finish", json={"event_id": cleared["event_id"]})
    assert status.json() == {"event_id": cleared["event_id"], "status": "finished", "kind": "clear", "detail": None}
    looked = client.post("/lookup", json={"tokens": PROMPT}).json()
    assert client.post("/check_finish", json={"event_id": looked["event_id"]}).json()["status"] == "finished"
    missing = client.post("/check_finish", json={"event_id": "nope"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "unknown event id 'nope'"}


def test_instances_health_and_worker_info_describe_registered_workers(registered: ControllerRunner) -> None:
    client = registered.client
    instances = client.get("/instances").json()["instances"]
    assert [i["instance_id"] for i in instances] == ["inst-a"]
    assert instances[0]["locations"] == ["LocalCPUBackend", "LocalDiskBackend"]
    assert instances[0]["chunks"] == 6  # 3 chunks in each location
    health = client.post("/health", json={"instance_id": "inst-a"}).json()
    assert health["error_codes"] == {"0": 0}
    info = client.post("/query_worker_info", json={"instance_id": "inst-a", "worker_ids": [0]}).json()
    worker = info["worker_infos"][0]
    assert worker["locations"]["LocalCPUBackend"] == {"chunks": 3, "tokens": 12}
    assert worker["hashing"]["chunk_size"] == 4
    assert worker["last_heartbeat_time"] > 0 or worker["seconds_since_heartbeat"] is not None


def test_metrics_report_workers_indexed_chunks_and_request_latency(registered: ControllerRunner) -> None:
    text = registered.client.get("/metrics").text
    assert "lmcache_controller_workers 1.0" in text
    assert 'lmcache_controller_indexed_chunks{location="LocalCPUBackend"} 3.0' in text
    assert "lmcache_controller_events_applied_total" in text
    assert 'lmcache_controller_request_seconds_count{route="/lookup"}' in text


def test_openapi_schema_lists_the_endpoints_with_their_models(controller: ControllerRunner) -> None:
    schema = controller.client.get("/openapi.json").json()
    assert {"/lookup", "/clear", "/check_finish", "/health", "/instances", "/query_worker_info", "/metrics", "/pin",
            "/unpin", "/move", "/query_instance", "/controller/workers", "/controller/key-stats"} <= set(schema["paths"])
    assert "HashingParams" in schema["components"]["schemas"]
    assert controller.client.get("/docs").status_code == 200


class HelloPlugin:
    """An outside plugin adding a route through ``lmcache_controller_routes``."""

    @hookimpl
    def lmcache_controller_routes(self) -> list[APIRouter]:
        router = APIRouter()

        @router.get("/workers/count")
        def count(controller: Controller = Depends(get_controller)) -> dict[str, int]:
            return {"workers": len(controller.workers)}

        return [router]


def test_a_plugin_contributes_routes_that_reach_the_controller(nats_url: str) -> None:
    pm = get_plugin_manager(extra_plugins=[HelloPlugin()])
    with ControllerRunner(nats_url, pm=pm) as runner:
        assert runner.client.get("/workers/count").json() == {"workers": 0}
        assert runner.client.post("/lookup", json={"tokens": [1]}).status_code == 200


def test_a_clear_still_answers_check_finish_after_70000_lookups(registered: ControllerRunner) -> None:
    client = registered.client
    cleared = client.post("/clear", json={"instance_id": "inst-a", "location": "LocalCPUBackend"}).json()
    looked = client.post("/lookup", json={"tokens": PROMPT}).json()

    def record_lookups() -> None:  # what 70,000 answered /lookup requests record, without the HTTP
        for _ in range(70_000):
            registered.controller.events.start("lookup", status="finished")

    registered.call(record_lookups)
    status = client.post("/check_finish", json={"event_id": cleared["event_id"]})
    assert status.status_code == 200
    assert status.json() == {"event_id": cleared["event_id"], "status": "finished", "kind": "clear", "detail": None}
    # lookups keep a bounded record of their own: the oldest are forgotten
    assert client.post("/check_finish", json={"event_id": looked["event_id"]}).status_code == 404
