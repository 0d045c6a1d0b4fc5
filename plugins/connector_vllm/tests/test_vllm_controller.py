"""The ``vllm serve`` walkthrough with a real controller: completions, /lookup, /clear, /lookup.

One OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``, the
``vllm serve`` entry point) runs the connector by its registered name with
``enable_controller: true``; its worker reports every chunk to a real ``lmcache_controller``
(with its embedded ``nats-server``). The sequence runs once for the module:

1. complete a 1,100-token prompt (stored in LocalCPUBackend), 2. the controller's /lookup
credits the instance with 1,024 tokens, 3. complete it again (served from the cache), 4. /clear
the CPU tier, 5. /lookup is empty, 6. complete it again (recomputed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_core.controller.cli import read_ready_line
from lmcache_core.testing import free_port

from vllm_helpers import make_prompt, write_config

INSTANCE = "vllm-serve-test"
HIT = 1024
START_TIMEOUT = 300.0


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _poll(fn: Any, until: Any, timeout: float, what: str) -> Any:
    """Call ``fn`` until ``until(result)`` holds or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if until(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {result!r} after {timeout}s")
        time.sleep(0.1)


@dataclass
class Walkthrough:
    completions: list[dict[str, Any]] = field(default_factory=list)
    lookups: list[dict[str, Any]] = field(default_factory=list)
    clear: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Walkthrough]:
    work = tmp_path_factory.mktemp("serve")
    http_port, bus_port, vllm_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}
    env["LMCACHE_WORKER_HEARTBEAT_INTERVAL"] = "0.5"
    with (work / "controller.log").open("w") as controller_log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1",
             "--port", str(http_port), "--monitor-port", str(bus_port), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=controller_log, text=True, env=env,
        )
    log_path = work / "vllm.log"
    server: subprocess.Popen[bytes] | None = None
    result = Walkthrough()
    try:
        read_ready_line(controller, "the controller", timeout=60)
        config = write_config(
            work / "lmcache.yaml",
            chunk_size=256,
            local_cpu=True,
            max_local_cpu_size=0.5,
            enable_controller=True,
            controller_url=f"127.0.0.1:{bus_port}",
            lmcache_instance_id=INSTANCE,
        )
        kv_config = {"kv_connector": "LMCacheCoreConnectorV1", "kv_role": "kv_both",
                     "kv_load_failure_policy": "recompute"}
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(vllm_port),
                 "--skip-tokenizer-init", "--enforce-eager", "--dtype", "float32",
                 "--max-model-len", "4096", "--no-enable-prefix-caching",
                 "--enable-prompt-tokens-details", "--kv-transfer-config", json.dumps(kv_config)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**env, "LMCACHE_CONFIG_FILE": str(config), "VLLM_CPU_KVCACHE_SPACE": "1"},
            )
        vllm = httpx.Client(base_url=f"http://127.0.0.1:{vllm_port}", timeout=120)
        ctl = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)

        def healthy() -> bool:
            assert server is not None and server.poll() is None, log_path.read_text()[-4000:]
            try:
                return vllm.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        _poll(healthy, bool, START_TIMEOUT, "vLLM health")
        prompt = make_prompt(1)

        def complete() -> dict[str, Any]:
            body = {"model": str(tiny_model), "prompt": prompt, "max_tokens": 16,
                    "temperature": 0, "ignore_eos": True, "return_token_ids": True}
            response = vllm.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            return {"token_ids": data["choices"][0]["token_ids"],
                    "cached_tokens": data["usage"]["prompt_tokens_details"]["cached_tokens"]}

        def lookup() -> dict[str, Any]:
            response = ctl.post("/lookup", json={"tokens": prompt})
            assert response.status_code == 200, response.text
            return response.json()["layout_info"]

        result.completions.append(complete())
        # the worker reports chunks asynchronously: wait until the controller knows them all
        result.lookups.append(_poll(lookup, lambda li: li.get(INSTANCE, [None, 0])[1] >= HIT, 30, "lookup"))
        result.completions.append(complete())
        response = ctl.post("/clear", json={"instance_id": INSTANCE, "location": "LocalCPUBackend"})
        assert response.status_code == 200, response.text
        result.clear = response.json()
        result.lookups.append(_poll(lookup, lambda li: li == {}, 30, "lookup after clear"))
        result.completions.append(complete())
        vllm.close()
        ctl.close()
    finally:
        if server is not None:
            _stop(server)
        _stop(controller)
    result.log = log_path.read_text(errors="replace")
    yield result


def test_controller_lookup_credits_the_vllm_instance_with_the_stored_prompt(
    walkthrough: Walkthrough,
) -> None:
    assert walkthrough.completions[0]["cached_tokens"] == 0
    assert walkthrough.lookups[0] == {INSTANCE: ["LocalCPUBackend", HIT]}


def test_second_completion_is_served_from_the_cache_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    first, second = walkthrough.completions[:2]
    assert second["cached_tokens"] == HIT
    assert second["token_ids"] == first["token_ids"]


def test_clear_empties_the_instance_and_lookup_finds_nothing(walkthrough: Walkthrough) -> None:
    assert walkthrough.clear["num_tokens"] == HIT
    assert walkthrough.lookups[1] == {}


def test_after_clear_the_prompt_is_recomputed_with_identical_tokens(
    walkthrough: Walkthrough,
) -> None:
    first, after_clear = walkthrough.completions[0], walkthrough.completions[2]
    assert after_clear["cached_tokens"] == 0
    assert after_clear["token_ids"] == first["token_ids"]
