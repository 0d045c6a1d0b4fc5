"""The real ``lmcache controller ...`` command against a real ``lmcache_controller`` process (with
an API token), a real nats-server and an ``examples/instance.py`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import INSTANCE, PROMPT, ControllerProcess, InstanceProcess, child_env, wait_for

pytestmark = pytest.mark.timeout(240)

LMCACHE = str(Path(sys.executable).parent / "lmcache")  # the installed console script
TOKEN = "cli-s3cret"
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
TOKENS = ",".join(map(str, PROMPT))


class Fleet:
    """A controller process with an API token and one instance process (chunk size 4, disk)."""

    def __init__(self, nats_url: str, tmp: Path) -> None:
        self.controller = ControllerProcess(nats_url, env={"LMCACHE_CONTROLLER_API_TOKEN": TOKEN})
        self.url = self.controller.ready["http"]
        self.controller.client.headers["Authorization"] = f"Bearer {TOKEN}"
        self.instance = InstanceProcess(nats_url, tmp, args=["--control"], env={"LMCACHE_CHUNK_SIZE": "4"})

    def run(self, *args: str, env: dict[str, str] | None = None, auth: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``lmcache controller ARGS`` (with --url and, unless ``auth`` is False, --api-token)."""
        action, *rest = args
        given = ["--url", self.url] + (["--api-token", TOKEN] if auth else [])
        return subprocess.run([LMCACHE, "controller", action, *given, *rest], capture_output=True, text=True,
                              timeout=60, env={**child_env(), **(env or {})}, input=stdin)

    def json(self, *args: str, stdin: str | None = None) -> Any:
        result = self.run(*args, "--json", stdin=stdin)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def text(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.stdout.strip()

    def close(self) -> None:
        self.instance.close()
        self.controller.close()


@pytest.fixture
def fleet(nats_url: str, tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(nats_url, tmp_path)
    try:
        wait_for(lambda: made.controller.lookup(PROMPT) == {INSTANCE: [CPU, 12]}, what="prompt credited")
        yield made
    finally:
        made.close()


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a failed command (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    return lines[-1]


def test_lookup_pin_unpin_move_clear_workers_and_stats_from_the_shell(fleet: Fleet) -> None:
    assert fleet.json("lookup", "--tokens", TOKENS)["layout_info"] == {INSTANCE: [CPU, 12]}
    assert fleet.text("lookup", "--tokens", TOKENS) == f"{INSTANCE}: 12 of 12 tokens, most at {CPU}"
    assert fleet.text("lookup", "--tokens", "5,6,7") == "no instance holds a prefix of these 3 tokens"
    # token ids from stdin, as a JSON array
    assert fleet.json("lookup", "--tokens", "-", stdin=json.dumps(PROMPT))["layout_info"] == {INSTANCE: [CPU, 12]}

    pinned = fleet.text("pin", "--instance", INSTANCE, "--location", CPU, "--tokens", TOKENS)
    assert pinned.startswith(f"pinned 12 tokens at {CPU} of {INSTANCE} (event pin-")
    assert fleet.instance.control("stats")["stats"][CPU]["pinned"] == 3
    unpinned = fleet.json("unpin", "--instance", INSTANCE, "--location", CPU, "--tokens", TOKENS)
    assert unpinned["num_tokens"] == 12
    assert fleet.instance.control("stats")["stats"][CPU]["pinned"] == 0

    assert fleet.json("clear", "--instance", INSTANCE, "--location", DISK)["num_tokens"] == 12
    moved = fleet.text("move", "--instance", INSTANCE, "--from", CPU, "--to", DISK, "--tokens", TOKENS)
    assert moved.startswith(f"moved 12 tokens from {CPU} to {DISK} of {INSTANCE} (event move-")
    assert fleet.instance.control("where", PROMPT)["chunks"] == {CPU: [False] * 3, DISK: [True] * 3}
    copied = fleet.json("move", "--instance", INSTANCE, "--from", DISK, "--to", CPU, "--copy")
    assert copied["num_tokens"] == 12
    assert fleet.instance.control("where", PROMPT)["chunks"] == {CPU: [True] * 3, DISK: [True] * 3}

    workers = fleet.json("workers")
    assert workers["total_count"] == 1 and workers["workers"][0]["key_count"] == 6
    table = fleet.text("workers", "--instance", INSTANCE, "--worker", "0").splitlines()
    assert table[0].split() == ["INSTANCE", "WORKER", "IP", "PORT", "KEYS", "LAST", "HEARTBEAT"]
    assert table[1].split()[:5] == [INSTANCE, "0", "127.0.0.1", "0", "6"]
    assert fleet.json("stats") == {
        "total_key_count": 6, "total_instance_count": 1, "total_worker_count": 1,
        "instances": [{"instance_id": INSTANCE, "key_count": 6, "worker_count": 1}],
    }
    assert fleet.text("stats").splitlines() == ["6 keys, 1 workers, 1 instances", f"{INSTANCE}: 6 keys, 1 workers"]

    cleared = fleet.text("clear", "--instance", INSTANCE, "--location", CPU)
    assert cleared.startswith(f"cleared 12 tokens from {CPU} of {INSTANCE} (event clear-")
    assert fleet.json("lookup", "--tokens", TOKENS)["layout_info"] == {INSTANCE: [DISK, 12]}


def test_url_and_token_come_from_the_environment(fleet: Fleet) -> None:
    env = {"LMCACHE_CONTROLLER_API_URL": fleet.url, "LMCACHE_CONTROLLER_API_TOKEN": TOKEN}
    result = subprocess.run([LMCACHE, "controller", "stats", "--json"], capture_output=True, text=True,
                            timeout=60, env={**child_env(), **env})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_worker_count"] == 1


def test_errors_are_one_line_on_stderr_with_exit_status_2(fleet: Fleet) -> None:
    line = _error_line(fleet.run("stats", auth=False))
    assert line == ("lmcache: error: the controller answered 401: missing or wrong bearer token "
                    "(give --api-token or $LMCACHE_CONTROLLER_API_TOKEN)")
    line = _error_line(fleet.run("pin", "--instance", "nope", "--location", CPU, "--tokens", "1"))
    assert line == f"lmcache: error: the controller answered 404: unknown instance 'nope'; registered instances: {INSTANCE}"
    line = _error_line(fleet.run("clear", "--instance", INSTANCE, "--location", "GPU"))
    assert line == f"lmcache: error: the controller answered 400: unknown location 'GPU'; available: {CPU}, {DISK}"
    line = _error_line(fleet.run("pin", "--instance", INSTANCE, "--location", CPU, "--tokens", str(2**32)))
    assert line.startswith("lmcache: error: the controller answered 422: body.tokens.0: ")
    line = _error_line(fleet.run("move", "--instance", INSTANCE, "--from", CPU, "--to", CPU, "--to-instance", INSTANCE))
    assert "name two different locations" in line
    line = _error_line(fleet.run("lookup", "--tokens", "1,x"))
    assert "expected comma-separated integers, got '1,x'" in line
    line = _error_line(fleet.run("lookup", "--tokens", "-", stdin="[1, 2.5]"))
    assert "JSON array of integer token ids" in line
    line = _error_line(fleet.run("pin", "--instance", INSTANCE, "--location", CPU))
    assert "the following arguments are required: --tokens" in line
    unreachable = subprocess.run(
        [LMCACHE, "controller", "workers", "--url", "http://127.0.0.1:9", "--timeout", "5"],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )
    assert _error_line(unreachable).startswith("lmcache: error: cannot reach the controller at http://127.0.0.1:9: ")
    assert os.path.exists(LMCACHE)
