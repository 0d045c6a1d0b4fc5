"""The managed nats-server: starts a real process, stops it, and never leaves an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from lmcache_core.errors import PluginError, TransportError
from lmcache_core.testing import free_port, running_nats_server
from lmcache_transport_nats import NatsServerProcess, NatsSettings, connect, embedded_server, pid_alive


def nats_server_pids(port: int) -> list[int]:
    """Live nats-server processes whose command line names ``port``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nats-server") and str(port).encode() in argv:
            if pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Poll, under a deadline, until process ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.anyio
async def test_embedded_server_runs_a_real_process_and_stops_it_without_orphans():
    port = free_port()
    async with embedded_server(NatsSettings(), "127.0.0.1", port) as url:
        assert url == f"nats://127.0.0.1:{port}"
        (pid,) = nats_server_pids(port)
        async with await connect(NatsSettings(), url) as bus:

            async def echo(message) -> None:
                await message.respond(message.payload)

            await bus.subscribe("echo", echo)
            assert await bus.request("echo", b"hi", timeout=5) == b"hi"
    assert not pid_alive(pid)
    assert nats_server_pids(port) == []


@pytest.mark.anyio
async def test_embedded_server_on_a_wildcard_host_yields_a_loopback_url():
    port = free_port()
    async with embedded_server(NatsSettings(nats_token="t0ken"), "0.0.0.0", port) as url:
        assert url == f"nats://127.0.0.1:{port}"
    assert nats_server_pids(port) == []


def test_server_dies_with_the_process_that_started_it_when_that_is_killed():
    port = free_port()
    script = textwrap.dedent(
        f"""
        import anyio, sys
        from lmcache_transport_nats import NatsSettings, embedded_server

        async def main():
            async with embedded_server(NatsSettings(), "127.0.0.1", {port}) as url:
                print(url, flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)

        anyio.run(main)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().decode().strip() == f"nats://127.0.0.1:{port}"
        (server_pid,) = nats_server_pids(port)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs: only the kernel can help
        parent.wait(10)
        assert wait_gone(server_pid), "nats-server outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in nats_server_pids(port):  # only on failure: do not leak into other tests
            os.kill(pid, signal.SIGKILL)


def test_server_that_cannot_start_fails_with_its_own_output():
    with running_nats_server() as first:
        second = NatsServerProcess("127.0.0.1", first.port)
        with pytest.raises(TransportError, match=r"(?s)exited with code \d+.*address already in use"):
            second.start()
        assert not second.is_running
        assert first.is_running


def test_stop_sends_sigkill_to_a_server_that_ignores_sigterm():
    server = NatsServerProcess(stop_timeout=0.2).start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    server.stop()
    assert not pid_alive(pid)
    server.stop()  # idempotent


def test_running_nats_server_restarts_on_the_same_port(nats_server):
    port, first_pid = nats_server.port, nats_server.pid
    nats_server.stop()
    assert not nats_server.is_running and nats_server_pids(port) == []
    nats_server.start()
    assert nats_server.port == port and nats_server.pid != first_pid
    assert nats_server_pids(port) == [nats_server.pid]


def test_nats_url_fixture_names_the_running_server(nats_server, nats_url):
    assert nats_url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.is_running


def test_running_nats_server_without_the_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmcache_transport_nats.server", None)  # import fails
    with pytest.raises(PluginError, match="pip install lmcache-transport-nats"):
        with running_nats_server():
            pass


def test_missing_server_binary_override_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCACHE_NATS_SERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(TransportError, match="LMCACHE_NATS_SERVER_BIN.*not an executable"):
        NatsServerProcess().start()
