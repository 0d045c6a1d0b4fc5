"""The bus locked down: credentials and roles on a real nats-server, forged identities refused by
the controller, and a controller that will not open an unauthenticated bus to the network."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from lmcache_core.testing import free_port, running_nats_server
from lmcache_core.wire import (
    LEGACY_REGISTER_TOPIC,
    EventBatch,
    Heartbeat,
    RegistrationAck,
    WorkerIdentity,
    events_topic,
    heartbeat_topic,
    register_topic,
)
from lmcache_transport_nats import NatsServerProcess, NatsSettings, connect
from lmcache_transport_nats.auth import authorization, new_nkey

from .support import PROMPT, ControllerRunner, Instance, InstanceProcess, controller_settings, read_json_line, stop_process, wait_for

pytestmark = pytest.mark.timeout(180)

CLI = [sys.executable, "-m", "lmcache_core.controller.cli"]
CPU = "LocalCPUBackend"
FLEET = {
    "nats_user": "lmcache-controller",
    "nats_password": "ctl-secret",
    "nats_instance_passwords": {"inst-a": "a-secret", "inst-b": "b-secret"},
}


@pytest.fixture
def secured_bus() -> Iterator[NatsServerProcess]:
    """A nats-server with the fleet's users and roles."""
    with running_nats_server(authorization=authorization(controller_settings(**FLEET))) as server:
        yield server


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused the ")]


async def _forge_as_inst_a(url: str, victim: WorkerIdentity, registration: bytes) -> RegistrationAck:
    """With inst-a's own credentials, on inst-a's own topics, claim to be inst-b (and rank 1)."""
    async with await connect(NatsSettings(nats_user="inst-a", nats_password="a-secret"), url) as bus:
        wipe = EventBatch.build(victim, CPU, 10**6, np.zeros(0), np.zeros(0), np.zeros(0), reset=True)
        await bus.publish(events_topic("inst-a", 0), wipe.encode())
        other_rank = WorkerIdentity(instance_id="inst-a", worker_id=1, epoch="forged")
        await bus.publish(
            events_topic("inst-a", 0),
            EventBatch.build(other_rank, CPU, 1, np.zeros(0), np.zeros(0), np.zeros(0), reset=True).encode(),
        )
        beat = Heartbeat(**victim.model_dump(exclude={"version"}), last_seq={CPU: 10**6})
        await bus.publish(heartbeat_topic("inst-a", 0), beat.encode())
        ack = RegistrationAck.decode(await bus.request(register_topic("inst-a", 0), registration, timeout=10))
        await bus.flush()
        return ack


def test_a_forged_identity_inside_an_authorised_message_is_refused_and_logged(
    secured_bus: NatsServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache_core.controller")
    with ControllerRunner(secured_bus.url, controller_settings(**FLEET)) as runner:
        a = Instance(secured_bus.url, "inst-a", tmp_path / "a", nats_user="inst-a", nats_password="a-secret")
        b = Instance(secured_bus.url, "inst-b", tmp_path / "b", nats_user="inst-b", nats_password="b-secret")
        try:
            for inst in (a, b):
                inst.store(PROMPT)
                inst.sync()
            expected = {**a.inventory_counts(), **b.inventory_counts()}
            wait_for(lambda: runner.holder_counts() == expected, what="both instances indexed")
            victim = b.worker.identity
            forged = b.worker.registration().model_copy(update={"epoch": "forged"})
            ack = anyio.run(_forge_as_inst_a, secured_bus.url, victim, forged.encode())

            assert not ack.accepted and "must be of the instance and rank it names" in ack.detail
            wait_for(lambda: len(_refusals(caplog)) >= 4, what="four refusals logged")
            refusals = _refusals(caplog)
            assert sum("event batch on 'events.inst-a.0'" in r for r in refusals) == 2
            assert any("heartbeat" in r and "inst-b/0" in r for r in refusals)
            assert any("registration" in r and "inst-b/0" in r for r in refusals)
            metrics = runner.client.get("/metrics").text
            assert 'lmcache_controller_identity_refused_total{kind="event batch"} 2.0' in metrics
            # nothing changed: inst-b keeps its entries and its epoch, inst-a has no rank 1
            assert runner.holder_counts() == expected
            assert runner.call(lambda: runner.controller.workers[("inst-b", 0)].epoch) == victim.epoch
            assert runner.lookup(PROMPT) == {"inst-a": [CPU, 12], "inst-b": [CPU, 12]}
        finally:
            b.close()
            a.close()


def test_controller_on_a_public_host_without_an_api_token_exits_2_naming_the_setting() -> None:
    done = subprocess.run(
        [*CLI, "--host", "0.0.0.0", "--port", "0", "--monitor-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--api-token" in lines[0] and "LMCACHE_CONTROLLER_API_TOKEN" in lines[0] and "0.0.0.0" in lines[0]
    assert lines[0].startswith("lmcache_controller: error:")


def test_controller_on_a_public_host_without_bus_credentials_exits_2_naming_the_setting() -> None:
    done = subprocess.run(
        [*CLI, "--host", "0.0.0.0", "--port", "0", "--monitor-port", str(free_port()), "--api-token", "t0ken"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "nats_user" in lines[0] and "nats_token" in lines[0] and "0.0.0.0" in lines[0]
    assert lines[0].startswith("lmcache_controller: error:")


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    cert, key = folder / "api.crt", folder / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_controller_tls_options_need_both_files_and_name_a_bad_one(tmp_path: Path) -> None:
    cert, _ = _self_signed_certificate(tmp_path)
    base = [*CLI, "--port", "0", "--monitor-port", str(free_port())]
    only_cert = subprocess.run([*base, "--ssl-certfile", str(cert)], capture_output=True, text=True, timeout=60)
    assert only_cert.returncode == 2 and "--ssl-keyfile is missing" in only_cert.stderr, only_cert.stderr
    missing = tmp_path / "nope.key"
    no_key = subprocess.run(
        [*base, "--ssl-certfile", str(cert), "--ssl-keyfile", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert no_key.returncode == 2 and str(missing) in no_key.stderr and "Traceback" not in no_key.stderr


@pytest.mark.parametrize("credential", ["password", "nkey"])
def test_secured_multi_machine_setup_of_the_readme_serves_lookups(tmp_path: Path, credential: str) -> None:
    controller_yaml = tmp_path / "controller.yaml"
    instance_yaml = tmp_path / "instance.yaml"
    instance_yaml.write_text(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 0.05\nenable_controller: true\n"
        "lmcache_instance_id: inst-a\n"
    )
    if credential == "password":
        controller_yaml.write_text(
            "nats_user: lmcache-controller\n"
            "nats_password: ctl-secret\n"
            "nats_instance_passwords:\n"
            "  inst-a: a-secret\n"
        )
        with instance_yaml.open("a") as out:
            out.write("nats_user: inst-a\nnats_password: a-secret\n")
    else:  # no shared secret anywhere: each side holds its own seed, the controller public keys
        controller_seed, instance_seed = tmp_path / "controller.nk", tmp_path / "inst-a.nk"
        new_nkey(controller_seed)
        controller_yaml.write_text(
            f"nats_nkey_seed_file: {controller_seed}\n"
            f"nats_instance_nkeys:\n  inst-a: {new_nkey(instance_seed)}\n"
        )
        with instance_yaml.open("a") as out:
            out.write(f"nats_nkey_seed_file: {instance_seed}\n")
    port, monitor = free_port(), free_port()
    cert, key = _self_signed_certificate(tmp_path)
    controller = subprocess.Popen(
        [*CLI, "--host", "0.0.0.0", "--port", str(port), "--monitor-port", str(monitor),
         "--config", str(controller_yaml), "--log-level", "WARNING", "--api-token", "api-s3cret",
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    instance = None
    try:
        ready = read_json_line(controller, "ready", "lmcache_controller")
        assert ready["http"].startswith("https://")
        instance = InstanceProcess(f"127.0.0.1:{monitor}", tmp_path, instance_id="inst-a", disk=False, config_file=instance_yaml)
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30, verify=str(cert), headers={"Authorization": "Bearer api-s3cret"}) as client:
            answer = wait_for(
                lambda: client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"], what="a lookup hit"
            )
            assert answer == {"inst-a": [CPU, 12]}
        # the same API refuses a client without the token, and plain HTTP gets no answer
        with httpx.Client(base_url=url, timeout=30, verify=str(cert)) as anonymous_client:
            assert anonymous_client.post("/lookup", json={"tokens": PROMPT}).status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/lookup", json={"tokens": PROMPT}, timeout=10)

        async def anonymous() -> None:
            await connect(NatsSettings(), f"127.0.0.1:{monitor}")

        with pytest.raises(Exception, match="refused"):
            anyio.run(anonymous)
    finally:
        if instance is not None:
            instance.close()
        stop_process(controller)


def test_a_worker_of_protocol_2_hears_why_it_is_not_registered(controller: ControllerRunner, nats_url: str) -> None:
    async def register_the_old_way() -> RegistrationAck:
        async with await connect(NatsSettings(), nats_url) as bus:
            return RegistrationAck.decode(await bus.request(LEGACY_REGISTER_TOPIC, b'{"version": 2}', timeout=10))

    ack = anyio.run(register_the_old_way)
    assert not ack.accepted and "register.<instance>.<rank>" in ack.detail and "upgrade" in ack.detail
    assert controller.call(lambda: dict(controller.controller.workers)) == {}
