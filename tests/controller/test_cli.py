"""``lmcache_controller`` as a real process: the issue's walkthrough, clean shutdown, argument errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmcache_core.testing import free_port

from .support import INSTANCE, PROMPT, REPO, InstanceProcess, read_json_line, wait_for

pytestmark = pytest.mark.timeout(180)

CLI = [sys.executable, "-m", "lmcache_core.controller.cli"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state in ("Z", "X")


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_walkthrough_of_the_issue_answers_exactly_and_sigterm_stops_everything(tmp_path: Path) -> None:
    port, monitor = free_port(), free_port()
    controller = subprocess.Popen(
        [*CLI, "--host", "localhost", "--port", str(port), "--monitor-port", str(monitor), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    instance = None
    try:
        ready = read_json_line(controller, "ready", "lmcache_controller")
        assert ready["http"] == f"http://localhost:{port}"
        nats_children = _children(controller.pid)
        assert nats_children, "the embedded nats-server should be a child of the controller"
        # the issue's example.yaml, unchanged but for the bus port
        instance = InstanceProcess(
            f"localhost:{monitor}", tmp_path, disk=False, config_file=REPO / "examples" / "example.yaml",
        )
        assert instance.ready["stored_tokens"] == 12
        with httpx.Client(base_url=f"http://localhost:{port}", timeout=30) as client:
            lookup = client.post("/lookup", json={"tokens": PROMPT}).json()
            assert lookup["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}
            assert set(lookup) == {"event_id", "layout_info"}
            cleared = client.post("/clear", json={"instance_id": INSTANCE, "location": "LocalCPUBackend"}).json()
            assert set(cleared) == {"event_id", "num_tokens"}
            assert cleared["num_tokens"] == 12
            after = client.post("/lookup", json={"tokens": PROMPT}).json()
            assert after["layout_info"] == {}
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0
        wait_for(lambda: all(_gone(pid) for pid in nats_children), timeout=10, what="nats-server gone")
    finally:
        if instance is not None:
            instance.close()
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
        controller.stdout.close()
        controller.stderr.close()


def test_walkthrough_example_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "walkthrough.py"), "--free-ports"],
        capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every answer as expected" in result.stdout
    assert '"layout_info": {"lmcache_default_instance": ["LocalCPUBackend", 12]}' in result.stdout


def test_two_instances_example_credits_each_instance_with_its_own_prefix() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "two_instances.py")],
        capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every answer as expected" in result.stdout
    assert '"layout_info": {"instance_a": ["LocalCPUBackend", 12], "instance_b": ["LocalCPUBackend", 8]}' in result.stdout


def test_a_port_in_use_exits_2_with_one_line_on_stderr() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_cli("--host", "127.0.0.1", "--port", str(port), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"lmcache_controller: error: cannot listen on 127.0.0.1:{port}: the port is already in use"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "99999", "--monitor-port", "1"], "expected a port number between 0 and 65535"),
        (["--port", "0"], "give --monitor-port"),
        (["--port", "0", "--monitor-port", "1", "--nats-url", "x"], "either --monitor-port or --nats-url"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = _run_cli(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_an_unreachable_nats_url_exits_2_without_a_traceback() -> None:
    port = free_port()
    result = _run_cli("--port", "0", "--nats-url", f"nats://127.0.0.1:{port}", "--startup-timeout", "10")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lmcache_controller: error:")
