"""Schemathesis against the live controller's OpenAPI schema: no generated input gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from lmcache_core.testing import running_nats_server

from .support import PROMPT, ControllerRunner, Instance, controller_settings, wait_for


@pytest.fixture(scope="module")
def live_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerRunner]:
    """A controller with one registered instance, shared by every generated case of this module."""
    with running_nats_server() as server:
        # a short command timeout keeps generated /clear and /health calls quick
        with ControllerRunner(server.url, controller_settings(controller_command_timeout=1.0)) as runner:
            inst = Instance(server.url, "lmcache_default_instance", Path(tmp_path_factory.mktemp("disk")))
            try:
                inst.store(PROMPT)
                inst.sync()
                wait_for(lambda: runner.lookup(PROMPT), what="instance credited")
                yield runner
            finally:
                inst.close()


def _operations() -> list[str]:
    return ["POST /lookup", "POST /clear", "POST /check_finish", "POST /health", "GET /instances",
            "POST /query_worker_info", "GET /metrics", "POST /pin", "POST /unpin", "POST /move",
            "POST /query_instance", "GET /controller/workers", "GET /controller/key-stats",
            "POST /compress", "POST /decompress", "GET /page/summary", "GET /"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("label", _operations())
def test_generated_requests_never_get_a_server_error(live_controller: ControllerRunner, label: str) -> None:
    # schemathesis' own pytest integration does not run under this pytest, so drive its
    # case strategies with hypothesis directly; checks and transport are schemathesis'
    api = schemathesis.openapi.from_url(f"{live_controller.url}/openapi.json")
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in api.get_all_operations())}
    assert set(_operations()) <= set(operations), sorted(operations)
    operation = operations[label]

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(
        max_examples=40, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True, database=None,
    )
    def run(case) -> None:
        response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
        statuses.append(response.status_code)

    statuses: list[int] = []
    run()
    print(label, sorted(set(statuses)), len(statuses))
    assert statuses and max(statuses) < 500
