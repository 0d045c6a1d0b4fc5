"""Converging without storms, with real instances on a real nats-server: one unknown worker is
asked alone to register again, a second instance with a running one's id is refused without
disturbing it, and a cleanly stopped worker leaves the index at once. Messages are counted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmcache_core.wire import HELLO_TOPIC, hello_topic, register_topic

from .support import PROMPT, ControllerRunner, Instance, controller_settings, counting, wait_for

pytestmark = pytest.mark.timeout(180)

CPU = "LocalCPUBackend"
OTHER_PROMPT = [7, 8, 9, 10, 11, 12, 13, 14]


def _indexed(runner: ControllerRunner, *instances: Instance) -> dict:
    expected: dict = {}
    for inst in instances:
        expected.update(inst.inventory_counts())
    return wait_for(lambda: runner.holder_counts() == expected and expected, what="the index to match")


def test_one_unknown_worker_is_asked_alone_and_nobody_else_resyncs(controller, make_instance, nats_url: str) -> None:
    a, b = make_instance("inst-a"), make_instance("inst-b")
    for inst in (a, b):
        inst.store(PROMPT)
        inst.sync()
    expected = _indexed(controller, a, b)
    a_before, b_before = a.worker.registrations, b.worker.registrations
    with counting(nats_url) as counter:
        # the controller loses inst-a (a missed heartbeat, say): its next heartbeat is unknown
        state = controller.controller
        controller.call(lambda: state._forget_worker(state.workers[("inst-a", 0)]))
        wait_for(lambda: a.worker.registrations > a_before, what="inst-a to register again")
        wait_for(lambda: controller.holder_counts() == expected, what="inst-a back in the index")
    assert counter.count(HELLO_TOPIC) == counter.count(hello_topic("inst-a", 0)) >= 1  # no fleet-wide hello
    assert b.worker.registrations == b_before
    assert counter.count(register_topic("inst-b", 0)) == 0
    assert counter.resets["events.inst-b.0"] == 0  # inst-b sent nothing again


def test_a_second_instance_with_a_running_ones_id_is_refused_without_a_storm(
    controller: ControllerRunner, nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    first = Instance(nats_url, "inst-a", tmp_path / "first")
    second = None
    try:
        first.store(PROMPT)
        first.sync()
        expected = _indexed(controller, first)
        registrations = first.worker.registrations
        resyncs = controller.call(lambda: controller.controller.metrics.resyncs._value.get())
        with counting(nats_url) as counter:
            second = Instance(nats_url, "inst-a", tmp_path / "second")  # same id, same rank
            second.store(OTHER_PROMPT)
            epoch = second.worker.identity.epoch
            # ten of its heartbeats (2 s): time for several registration retries and hellos
            wait_for(lambda: counter.beats[epoch] >= 10, what="the second instance's heartbeats")
        assert not second.worker.registered
        # the running instance was not disturbed: no hello, no resync, no registration
        assert counter.count(HELLO_TOPIC) == 0
        assert counter.resets["events.inst-a.0"] == 0
        assert first.worker.registrations == registrations
        assert controller.call(lambda: controller.controller.metrics.resyncs._value.get()) == resyncs
        assert 1 <= counter.count(register_topic("inst-a", 0)) <= 8  # the refused one's backoff
        assert controller.holder_counts() == expected
        assert controller.lookup(PROMPT) == {"inst-a": [CPU, 12]}
        assert controller.lookup(OTHER_PROMPT) == {}
        # an error on both sides, once each
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        on_controller = [r for r in errors if r.name.startswith("lmcache_core.controller.")]
        on_worker = [r for r in errors if r.name == "lmcache_core.worker"]
        assert len(on_controller) == 1 and "belongs to a running worker" in on_controller[0].getMessage()
        assert len(on_worker) == 1 and "lmcache_instance_id" in on_worker[0].getMessage()

        first.close()  # a clean stop: the second takes over on its next retry
        wait_for(lambda: controller.lookup(OTHER_PROMPT) == {"inst-a": [CPU, 8]}, what="the second to take over")
        assert controller.lookup(PROMPT) == {}
    finally:
        if second is not None:
            second.close()
        first.close()


def test_a_cleanly_stopped_worker_leaves_the_index_at_once(nats_url: str, tmp_path: Path) -> None:
    # heartbeats would take a minute to notice: only the goodbye can be this quick
    with ControllerRunner(nats_url, controller_settings(controller_heartbeat_timeout=60.0)) as runner:
        a = Instance(nats_url, "inst-a", tmp_path / "a")
        b = Instance(nats_url, "inst-b", tmp_path / "b")
        try:
            for inst in (a, b):
                inst.store(PROMPT)
                inst.sync()
            _indexed(runner, a, b)
            a.close()
            wait_for(lambda: runner.lookup(PROMPT) == {"inst-b": [CPU, 12]}, timeout=10, what="inst-a gone")
            assert "inst-a" not in runner.call(lambda: set(runner.controller.instances))
            metrics = runner.client.get("/metrics").text
            assert "lmcache_controller_workers_left_total 1.0" in metrics
            assert "lmcache_controller_workers_expired_total 0.0" in metrics
        finally:
            b.close()
