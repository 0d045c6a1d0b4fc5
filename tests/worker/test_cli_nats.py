"""``lmcache nats`` against a real instance process (examples/instance.py) on a real nats-server."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_core.cli import main
from lmcache_core.config import load_settings
from lmcache_core.plugins import get_plugin_manager
from lmcache_core.testing import free_port, running_nats_server
from lmcache_core.wire import ResyncCommand

from .conftest import INSTANCE, PROMPT, WAIT, ControllerPeer

REPO = Path(__file__).resolve().parents[2]
TOKENS = ",".join(map(str, PROMPT))


def read_line(stream: Any, timeout: float, what: str) -> str:
    """One line from a subprocess pipe, waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                line = stream.readline()
                if not line:
                    raise AssertionError(f"stream closed while waiting for {what}")
                return line
    finally:
        selector.close()
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A nats-server, a peer answering registrations, one instance process holding the prompt."""
    disk = tmp_path_factory.mktemp("disk")
    with running_nats_server() as server:
        env = {
            **os.environ,
            "LMCACHE_CONFIG_FILE": str(REPO / "examples" / "example.yaml"),
            "LMCACHE_CONTROLLER_URL": server.url,
            "LMCACHE_LOCAL_DISK": str(disk),
            "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.05",
            "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05",
            "LMCACHE_WORKER_HEARTBEAT_INTERVAL": "0.2",
        }
        peer = ControllerPeer(
            load_settings(get_plugin_manager(), config_file=None), server.url
        ).start()
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "instance.py")],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = json.loads(read_line(proc.stdout, 60, "the instance's ready line"))
            yield {"url": server.url, "proc": proc, "ready": ready, "peer": peer, "env": env}
        finally:
            proc.terminate()
            try:
                assert proc.wait(WAIT) == 0, proc.stderr.read()
            finally:
                if proc.poll() is None:
                    proc.kill()
                peer.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["nats", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_instance_prints_ready_with_the_stored_tokens_and_locations(setup) -> None:
    assert setup["ready"]["ready"] is True
    assert setup["ready"]["stored_tokens"] == 12
    assert setup["ready"]["locations"] == ["LocalCPUBackend", "LocalDiskBackend"]


def test_workers_lists_the_running_instance(setup, capsys) -> None:
    code, out, _ = cli(capsys, "workers", "--url", setup["url"], "--json", "--listen", "0.6")
    assert code == 0
    rows = json.loads(out)
    assert [(r["instance_id"], r["worker_id"]) for r in rows] == [(INSTANCE, 0)]
    row = rows[0]
    assert row["model_name"] == "demo-model" and row["pid"] == setup["proc"].pid
    assert row["locations"] == ["LocalCPUBackend", "LocalDiskBackend"]
    assert row["chunks"] == {"LocalCPUBackend": 1, "LocalDiskBackend": 1}
    code, out, _ = cli(capsys, "workers", "--url", setup["url"], "--listen", "0.6")
    assert code == 0 and out.startswith(f"{INSTANCE}/0: LocalCPUBackend=1 chunks")


def test_lookup_then_clear_report_tokens_in_text_and_json(setup, capsys) -> None:
    url = setup["url"]
    code, out, _ = cli(capsys, "lookup", "--url", url, "--instance", INSTANCE, "--tokens", TOKENS)
    assert code == 0 and out.strip() == f"{INSTANCE}/0: 12 of 12 tokens (most in LocalCPUBackend)"
    code, out, _ = cli(
        capsys,
        "lookup",
        "--url",
        url,
        "--instance",
        INSTANCE,
        "--worker",
        "0",
        "--tokens",
        TOKENS,
        "--json",
    )
    data = json.loads(out)
    assert (code, data["num_tokens"], data["location"]) == (0, 12, "LocalCPUBackend")
    code, out, _ = cli(
        capsys,
        "clear",
        "--url",
        url,
        "--instance",
        INSTANCE,
        "--location",
        "LocalCPUBackend",
        "--json",
    )
    data = json.loads(out)
    assert (code, data["num_tokens"], data["location"]) == (0, 12, "LocalCPUBackend")
    assert data["workers"][0]["last_seq"]["LocalCPUBackend"] >= 1
    code, out, _ = cli(capsys, "lookup", "--url", url, "--instance", INSTANCE, "--tokens", TOKENS)
    assert (
        out.strip() == f"{INSTANCE}/0: 12 of 12 tokens (most in LocalDiskBackend)"
    )  # disk kept it


def test_clear_of_an_unknown_location_exits_2_with_a_message_and_no_traceback(setup) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmcache_core.cli",
            "nats",
            "clear",
            "--url",
            setup["url"],
            "--instance",
            INSTANCE,
            "--location",
            "GPUBackend",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert (
        "unknown location 'GPUBackend'; available: LocalCPUBackend, LocalDiskBackend"
        in result.stderr
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unknown_instance_and_absent_server_exit_2(setup, capsys) -> None:
    code, out, err = cli(
        capsys, "lookup", "--url", setup["url"], "--instance", "ghost", "--tokens", "1,2"
    )
    assert code == 2 and "no worker answers for instance 'ghost'" in err and out == ""
    nowhere = f"127.0.0.1:{free_port()}"
    code, _, err = cli(capsys, "workers", "--url", nowhere, "--listen", "0.1")
    assert code == 2 and err.startswith("lmcache: error:") and "127.0.0.1" in err


def test_watch_prints_decoded_event_batches_and_heartbeats(setup, capsys) -> None:
    code, out, _ = cli(capsys, "watch", "--url", setup["url"], "--count", "2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert all(line.startswith(f"heartbeat {INSTANCE}/0: LocalCPUBackend: ") for line in lines)

    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmcache_core.cli",
            "nats",
            "watch",
            "--url",
            setup["url"],
            "--json",
            "--no-heartbeats",
            "--count",
            "1",
            "--instance",
            INSTANCE,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert read_line(watch.stderr, 60, "watch to subscribe").startswith("watching ")
        setup["peer"].command(ResyncCommand(locations=["LocalDiskBackend"]))
        message = json.loads(read_line(watch.stdout, WAIT, "an event batch"))
        assert watch.wait(WAIT) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
    assert (message["type"], message["location"], message["reset"]) == (
        "events",
        "LocalDiskBackend",
        True,
    )
    assert message["counts"]["admit"] == 1 and message["events"][0]["tokens"] == 12


def test_instance_without_a_controller_exits_2_after_its_ready_timeout(setup) -> None:
    # another subject prefix on the same server: nobody answers its registration
    env = {**setup["env"], "LMCACHE_NATS_SUBJECT_PREFIX": "nobody_here"}
    del env["LMCACHE_LOCAL_DISK"]  # CPU only: the running instance owns that directory
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "instance.py"), "--ready-timeout", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "no controller accepted the registration within 1s" in result.stderr
    assert "Traceback" not in result.stderr


def test_clear_and_lookup_without_worker_address_every_rank(
    make_settings, pm, peer, nats_server, capsys
) -> None:
    from lmcache_core.engine import CacheEngine, EngineMetadata
    from lmcache_core.worker import start_worker

    from .conftest import kv

    settings = make_settings(local_disk=None)
    ranks = [
        CacheEngine(
            settings, EngineMetadata("m", world_size=2, worker_id=r), pm, start_worker=False
        )
        for r in (0, 1)
    ]
    workers = [start_worker(engine) for engine in ranks]
    try:
        assert all(w.wait_registered(WAIT) for w in workers)
        ranks[0].store(PROMPT, kv(12))
        ranks[1].store(PROMPT[:5], kv(5))  # rank 1 holds a different (shorter) prefix
        url = nats_server.url
        code, out, _ = cli(
            capsys, "lookup", "--url", url, "--instance", INSTANCE, "--tokens", TOKENS, "--json"
        )
        data = json.loads(out)
        assert code == 0 and [w["num_tokens"] for w in data["workers"]] == [12, 0]
        assert data["num_tokens"] == 0  # an instance's prefix is the shortest over its ranks
        code, out, _ = cli(
            capsys, "clear", "--url", url, "--instance", INSTANCE, "--location", "LocalCPUBackend"
        )
        assert code == 0 and out.splitlines() == [
            f"{INSTANCE}/0: cleared 12 tokens from LocalCPUBackend",
            f"{INSTANCE}/1: cleared 5 tokens from LocalCPUBackend",
        ]
    finally:
        for worker, engine in zip(workers, ranks, strict=True):
            worker.close()
            engine.close()
