"""Bus roles against a real nats-server: who may connect, publish and subscribe to what."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from lmcache_core.errors import ConfigError, RequestTimeout, TransportError
from lmcache_core.testing import free_port, running_nats_server
from lmcache_core.wire import (
    HELLO_TOPIC,
    command_topic,
    events_topic,
    goodbye_topic,
    heartbeat_topic,
    hello_topic,
    register_topic,
)
from lmcache_transport_nats import NatsSettings, connect, embedded_server, find_nats_server_binary
from lmcache_core.netaddr import is_loopback
from lmcache_transport_nats.auth import authorization, new_nkey

pytestmark = pytest.mark.anyio

FLEET = NatsSettings(
    nats_user="controller",
    nats_password="ctl-secret",
    nats_instance_passwords={"inst-a": "a-secret", "inst.b": "b-secret"},
)
AS_CONTROLLER = {"nats_user": "controller", "nats_password": "ctl-secret"}
AS_A = {"nats_user": "inst-a", "nats_password": "a-secret"}
AS_B = {"nats_user": "inst.b", "nats_password": "b-secret"}


@pytest.fixture
def fleet_server():
    with running_nats_server(authorization=authorization(FLEET)) as server:
        yield server


class Recorder:
    """Every message a subscription got, by topic."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    async def __call__(self, message) -> None:
        self.topics.append(message.topic)
        if message._reply:
            await message.respond(b"ok")


async def test_a_client_without_or_with_wrong_credentials_cannot_connect(fleet_server):
    for settings in ({}, {"nats_user": "inst-a", "nats_password": "b-secret"}, {"nats_token": "x"}):
        with pytest.raises(TransportError, match="refused"):
            await connect(NatsSettings(**settings), fleet_server.url)


async def test_instance_credentials_cannot_command_greet_or_speak_for_another_instance(
    fleet_server, open_bus, caplog
):
    controller = await open_bus(fleet_server.url, **AS_CONTROLLER)
    seen = Recorder()
    for topic in ("cmd.>", HELLO_TOPIC, "events.>", "heartbeat.>", "register.>"):
        await controller.subscribe(topic, seen)
    rogue = await open_bus(fleet_server.url, **AS_A)
    caplog.set_level(logging.WARNING, logger="lmcache_transport_nats.bus")

    with pytest.raises(RequestTimeout):  # the server drops it: nobody ever answers
        await rogue.request(command_topic("inst.b", 0), b'{"op": "clear"}', timeout=0.5)
    with pytest.raises(RequestTimeout):
        await rogue.request(register_topic("inst.b", 0), b"{}", timeout=0.5)
    for topic in (HELLO_TOPIC, events_topic("inst.b", 0), heartbeat_topic("inst.b", 0)):
        await rogue.publish(topic, b"{}")
    # what is its own goes through, and proves the refused ones above were processed first
    await rogue.publish(events_topic("inst-a", 0), b"{}")
    await rogue.flush()
    await controller.flush()
    with anyio.fail_after(5):
        while events_topic("inst-a", 0) not in seen.topics:
            await anyio.sleep(0.01)
    assert seen.topics == [events_topic("inst-a", 0)]
    # the client logs each refusal the server reports (nats-py lower-cases it)
    violations = [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage()]
    for subject in ("cmd.inst%2eb.0", "register.inst%2eb.0", "controller.hello", "events.inst%2eb.0"):
        assert any(f"lmcache.{subject}" in line for line in violations), (subject, violations)


async def test_instance_credentials_hear_only_their_own_commands(fleet_server, open_bus, caplog):
    controller = await open_bus(fleet_server.url, **AS_CONTROLLER)
    eavesdropper = await open_bus(fleet_server.url, **AS_A)
    caplog.set_level(logging.WARNING, logger="lmcache_transport_nats.bus")
    overheard = Recorder()
    for topic in (command_topic("inst.b", 0), "cmd.>", "events.>", "_INBOX.>"):
        await eavesdropper.subscribe(topic, overheard)
    victim = await open_bus(fleet_server.url, **AS_B)
    await victim.subscribe(command_topic("inst.b", 0), Recorder())
    assert await controller.request(command_topic("inst.b", 0), b"clear", timeout=5) == b"ok"
    await controller.publish(events_topic("inst.b", 0), b"{}")
    await controller.flush()
    await eavesdropper.flush()
    assert overheard.topics == []
    assert any("permissions violation for subscription" in r.getMessage() for r in caplog.records)


async def test_an_instance_registers_reports_and_answers_commands_with_its_own_credentials(
    fleet_server, open_bus
):
    controller = await open_bus(fleet_server.url, **AS_CONTROLLER)
    seen = Recorder()
    for topic in ("register.*.*", "heartbeat.*.*", "goodbye.*.*"):
        await controller.subscribe(topic, seen)
    worker = await open_bus(fleet_server.url, **AS_B)
    await worker.subscribe(command_topic("inst.b", 1), Recorder())
    hello = Recorder()
    await worker.subscribe(HELLO_TOPIC, hello)
    await worker.subscribe(hello_topic("inst.b", 1), hello)
    assert await worker.request(register_topic("inst.b", 1), b"{}", timeout=5) == b"ok"
    await worker.publish(heartbeat_topic("inst.b", 1), b"{}")
    await worker.publish(goodbye_topic("inst.b", 1), b"{}")
    await worker.flush()
    assert await controller.request(command_topic("inst.b", 1), b"ping", timeout=5) == b"ok"
    await controller.publish(HELLO_TOPIC, b"{}")
    await controller.publish(hello_topic("inst.b", 1), b"{}")
    await controller.flush()
    with anyio.fail_after(5):
        while len(hello.topics) < 2 or len(seen.topics) < 3:
            await anyio.sleep(0.01)
    assert sorted(seen.topics) == sorted(
        [register_topic("inst.b", 1), heartbeat_topic("inst.b", 1), goodbye_topic("inst.b", 1)]
    )
    assert sorted(hello.topics) == sorted([HELLO_TOPIC, hello_topic("inst.b", 1)])


async def test_the_embedded_server_refuses_to_run_open_beyond_loopback():
    with pytest.raises(ConfigError, match="nats_user and nats_password.*nats_instance_passwords.*nats_token"):
        async with embedded_server(NatsSettings(), "0.0.0.0", free_port()):
            pass
    async with embedded_server(FLEET, "0.0.0.0", free_port()) as url:
        with pytest.raises(TransportError, match="refused"):
            await connect(NatsSettings(), url)
        async with await connect(NatsSettings(**AS_A), url) as bus:
            assert bus.is_connected


def test_loopback_hosts_are_told_from_the_rest():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("no-such-host.invalid")


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"nats_instance_passwords": {"a": "x"}}, "need the controller's own bus user"),
        ({"nats_user": "c", "nats_password": "p", "nats_token": "t"}, "either nats_token or the controller's"),
        ({"nats_user": "c"}, "non-empty nats_password"),
        ({"nats_user": "a", "nats_password": "p", "nats_instance_passwords": {"a": "x"}}, "name of its own"),
        ({"nats_user": "c", "nats_password": "p", "nats_instance_passwords": {"a": ""}}, "is empty"),
        (
            {"nats_user": "c", "nats_password": "p", "nats_instance_passwords": {"a": "x"},
             "nats_instance_nkeys": {"a": "U" + "A" * 55}},
            "in both",
        ),
    ],
)
def test_credentials_a_server_cannot_serve_are_a_config_error_naming_the_keys(settings, problem):
    with pytest.raises(ConfigError, match=problem):
        authorization(NatsSettings(**settings))


def test_auth_module_prints_a_configuration_nats_server_accepts(tmp_path: Path):
    config = tmp_path / "controller.yaml"
    config.write_text(
        "nats_user: controller\nnats_password: ctl-secret\n"
        "nats_instance_passwords:\n  inst-a: a-secret\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "lmcache_transport_nats.auth_config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    block = json.loads(done.stdout)["authorization"]
    assert [user["user"] for user in block["users"]] == ["controller", "inst-a"]
    server_config = tmp_path / "auth.json"
    server_config.write_text(done.stdout)
    checked = subprocess.run(
        [str(find_nats_server_binary()), "-t", "-c", str(server_config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout

    config.write_text("nats_subject_prefix: lmcache\n")
    refused = subprocess.run(
        [sys.executable, "-m", "lmcache_transport_nats.auth_config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "nats_user" in refused.stderr


async def test_nkey_users_sign_in_without_a_shared_secret_and_keep_their_roles(tmp_path: Path, open_bus):
    controller_seed, a_seed, stranger_seed = (tmp_path / f"{name}.nk" for name in ("ctl", "a", "stranger"))
    new_nkey(controller_seed)
    a_public = new_nkey(a_seed)
    new_nkey(stranger_seed)
    fleet = NatsSettings(
        nats_nkey_seed_file=controller_seed,
        nats_instance_nkeys={"inst-a": a_public},
        nats_instance_passwords={"inst.b": "b-secret"},
    )
    block = authorization(fleet)
    assert controller_seed.read_text().strip() not in json.dumps(block)  # public keys only
    with running_nats_server(authorization=block) as server:
        controller = await open_bus(server.url, nats_nkey_seed_file=controller_seed)
        seen = Recorder()
        await controller.subscribe("register.*.*", seen)
        await controller.subscribe("events.>", seen)
        worker = await open_bus(server.url, nats_nkey_seed_file=a_seed)
        # its reply comes back through its own inbox, _INBOX.<public key>
        assert await worker.request(register_topic("inst-a", 0), b"{}", timeout=5) == b"ok"
        await worker.publish(events_topic("inst.b", 0), b"{}")  # refused by the server
        await worker.publish(events_topic("inst-a", 0), b"{}")
        await worker.flush()
        with anyio.fail_after(5):
            while len(seen.topics) < 2:
                await anyio.sleep(0.01)
        assert seen.topics == [register_topic("inst-a", 0), events_topic("inst-a", 0)]
        with pytest.raises(TransportError, match="refused"):
            await connect(NatsSettings(nats_nkey_seed_file=stranger_seed), server.url)


def test_new_nkey_writes_a_private_seed_once_and_prints_its_public_key(tmp_path: Path):
    seed = tmp_path / "inst-a.nk"
    command = [sys.executable, "-m", "lmcache_transport_nats.auth_config", "--new-nkey", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    public = done.stdout.strip()
    assert public.startswith("U") and len(public) == 56
    assert seed.stat().st_mode & 0o777 == 0o600 and seed.read_text().startswith("SU")
    assert NatsSettings(nats_instance_nkeys={"inst-a": public}).nats_instance_nkeys == {"inst-a": public}
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "File exists" in again.stderr and again.stderr.count("\n") == 1


def test_a_malformed_public_nkey_is_a_settings_error():
    with pytest.raises(ValueError, match="public user nkey"):
        NatsSettings(nats_instance_nkeys={"inst-a": "SUAB"})
