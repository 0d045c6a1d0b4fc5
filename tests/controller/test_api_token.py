"""The API token: compared in constant time, required on websockets too, and never empty."""

from __future__ import annotations

import hmac
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import APIRouter, WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from lmcache_core.hookspecs import hookimpl
from lmcache_core.plugins import get_plugin_manager
from lmcache_core.testing import free_port

from .support import ControllerRunner, controller_settings

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret"
CLI = [sys.executable, "-m", "lmcache_core.controller.cli"]


def test_every_token_is_compared_as_a_digest_of_one_length(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return original(a, b)

    with ControllerRunner(nats_url, controller_settings(controller_api_token=TOKEN)) as runner:
        monkeypatch.setattr(hmac, "compare_digest", spy)
        sent = [None, "Bearer", "Bearer s", "Bearer s3cre", "Bearer s3creT", "Bearer " + "s3cret" * 1000, "s3cret"]
        for value in sent:
            headers = {} if value is None else {"Authorization": value}
            assert runner.client.get("/instances", headers=headers).status_code == 401, value
        assert runner.client.get("/instances", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # a missing header too: whatever was sent, the same comparison of two SHA-256 digests
    assert compared == [(32, 32)] * (len(sent) + 1)


class SocketPlugin:
    """An outside plugin adding a websocket endpoint through ``lmcache_controller_routes``."""

    @hookimpl
    def lmcache_controller_routes(self) -> list[APIRouter]:
        router = APIRouter()

        @router.websocket("/ws")
        async def hello(socket: WebSocket) -> None:
            await socket.accept()
            await socket.send_text("hello")
            await socket.close()

        return [router]


def test_a_websocket_needs_the_token_like_every_endpoint(nats_url: str) -> None:
    pm = get_plugin_manager(extra_plugins=[SocketPlugin()])
    with ControllerRunner(nats_url, controller_settings(controller_api_token=TOKEN), pm=pm) as runner:
        url = runner.url.replace("http://", "ws://") + "/ws"
        for headers in [{}, {"Authorization": "Bearer nope"}]:
            with pytest.raises(InvalidStatus) as refused:
                connect(url, additional_headers=headers, open_timeout=10)
            assert refused.value.response.status_code == 401
            assert refused.value.response.body == b'{"detail": "missing or wrong bearer token"}'
        with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, open_timeout=10) as socket:
            assert socket.recv(timeout=10) == "hello"


@pytest.mark.parametrize("how", ["--api-token", "env", "yaml"])
def test_an_empty_token_is_refused_at_start_with_exit_2(how: str, tmp_path: Path) -> None:
    args = [*CLI, "--port", "0", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--startup-timeout", "5"]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LMCACHE_")}
    if how == "--api-token":
        args += ["--api-token", ""]
    elif how == "env":
        env["LMCACHE_CONTROLLER_API_TOKEN"] = ""
    else:
        config = tmp_path / "controller.yaml"
        config.write_text('controller_api_token: ""\n')
        args += ["--config", str(config)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("lmcache_controller: error: bad value for config key 'controller_api_token'")
    assert "an empty token would turn authentication off" in line
