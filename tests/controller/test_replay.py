"""Delayed, lost and duplicated event batches of real workers on a real nats-server, through a
fault-injecting bus: a late batch is applied in order, a lost one is replayed from what the
worker retains, and only a range it no longer retains costs a resync, of that worker alone.
Commands carry a deadline: a paused worker never carries out a clear answered 504."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmcache_core.testing import FaultPlan
from lmcache_core.wire import command_topic, events_topic

from .support import (
    INSTANCE,
    PROMPT,
    WAIT,
    ControllerRunner,
    Instance,
    InstanceProcess,
    controller_settings,
    counting,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

CPU = "LocalCPUBackend"
MORE = [7, 8, 9, 10, 11, 12, 13, 14]
EVEN_MORE = [21, 22, 23, 24, 25, 26, 27, 28]


def _metric(runner: ControllerRunner, name: str) -> float:
    return runner.call(lambda: getattr(runner.controller.metrics, name)._value.get())


def _indexed(runner: ControllerRunner, *instances: Instance) -> dict:
    expected: dict = {}
    for inst in instances:
        expected.update(inst.inventory_counts())
    return wait_for(lambda: runner.holder_counts() == expected and expected, what="the index to match the workers")


def _gap_seen(runner: ControllerRunner, inst: Instance) -> bool:
    """Whether the controller knows of a batch of ``inst`` that it has not applied."""

    def read() -> bool:
        worker = runner.controller.workers[(inst.instance_id, inst.worker_id)]
        return any(loc.known_seq > loc.applied_seq for loc in worker.locations.values())

    return runner.call(read)


def _started(nats_url: str, grace: float, **settings) -> ControllerRunner:
    return ControllerRunner(nats_url, controller_settings(controller_gap_grace=grace, **settings))


def _indexed_instances(runner: ControllerRunner, make_instance, *names: str, **settings) -> list[Instance]:
    """Instances (the first with ``settings``) holding PROMPT, once the index matches them."""
    made = [make_instance(name, **(settings if i == 0 else {})) for i, name in enumerate(names)]
    for inst in made:
        inst.store(PROMPT)
        inst.sync()
    _indexed(runner, *made)
    return made


def test_a_delayed_batch_overtaken_by_heartbeats_is_applied_without_a_resync(nats_url: str, make_instance) -> None:
    with _started(nats_url, grace=WAIT) as runner:
        [a] = _indexed_instances(runner, make_instance, "inst-a")
        with counting(nats_url) as counter:
            faulty = a.inject_faults(FaultPlan("hold"))
            a.store(MORE)  # its batch is held back on the way
            wait_for(lambda: faulty.held, what="the batch to be held")
            beats = counter.count("heartbeat")
            wait_for(lambda: counter.count("heartbeat") >= beats + 2, what="heartbeats to overtake it")
            assert _gap_seen(runner, a)  # the heartbeats announced it
            assert a.on_worker_loop(faulty.release) == 1
            _indexed(runner, a)
        assert _metric(runner, "resyncs") == 0 and _metric(runner, "replays") == 0
        assert counter.count("cmd") == 0 and sum(counter.resets.values()) == 0


def test_a_burst_of_batches_behind_a_slow_controller_converges_without_replay_or_resync(nats_url: str, make_instance) -> None:
    with _started(nats_url, grace=0.2) as runner:
        [a] = _indexed_instances(runner, make_instance, "inst-a")
        controller = runner.controller
        apply_batch = controller.apply_batch
        holding = True

        def hold_everything(topic: str, payload: bytes) -> str:
            return "hold" if holding and topic.startswith(("events.", "heartbeat.")) else "pass"

        def slow_apply(batch, arrays=None):
            # each batch takes a while (a huge one, a loaded host): the ones after it queue up
            # in the transport while heartbeats, on their own subscription, announce them
            time.sleep(0.1)
            return apply_batch(batch, arrays)

        faulty = a.inject_faults(hold_everything)
        for step in range(8):
            a.store([500 + 8 * step + i for i in range(8)], seed=step)
            a.sync()  # its own batches
        # a heartbeat numbered after the last batch, so released after them
        wait_for(lambda: faulty.held[-1][0].startswith("heartbeat."), what="a heartbeat after the batches")
        runner.call(setattr, controller, "apply_batch", slow_apply)
        try:
            holding = False
            assert a.on_worker_loop(faulty.release) >= 16  # a burst: seconds of work queued
            _indexed(runner, a)
        finally:
            runner.call(setattr, controller, "apply_batch", apply_batch)
        assert _metric(runner, "replays") == 0 and _metric(runner, "resyncs") == 0


def test_batches_reordered_or_duplicated_on_the_way_converge_without_commands(nats_url: str, make_instance) -> None:
    with _started(nats_url, grace=WAIT) as runner:
        [a] = _indexed_instances(runner, make_instance, "inst-a")
        with counting(nats_url) as counter:
            plan = FaultPlan(then="hold")
            faulty = a.inject_faults(plan)
            for tokens in (MORE, EVEN_MORE):
                a.store(tokens)
                a.sync()  # published: into the wrapper's hold
            assert a.on_worker_loop(faulty.release, True) >= 2  # newest first
            plan.then = "duplicate"
            a.engine.remove(MORE)  # evicts, published twice
            a.sync()
            plan.then = "pass"
            _indexed(runner, a)
        assert _metric(runner, "resyncs") == 0 and _metric(runner, "replays") == 0
        assert _metric(runner, "late_batches_applied") >= 1
        assert counter.count("cmd") == 0


def test_a_dropped_batch_is_replayed_from_the_worker_without_a_full_resync(nats_url: str, make_instance) -> None:
    with _started(nats_url, grace=1.0) as runner:
        a, b = _indexed_instances(runner, make_instance, "inst-a", "inst-b")
        with counting(nats_url) as counter:
            faulty = a.inject_faults(FaultPlan("drop"))
            a.store(MORE)  # lost on the way
            wait_for(lambda: faulty.dropped, what="the batch to be dropped")
            a.store(EVEN_MORE)  # arrives, and waits for the lost one
            _indexed(runner, a, b)
        assert _metric(runner, "replays") >= 1 and _metric(runner, "resyncs") == 0
        assert sum(counter.resets.values()) == 0  # nobody sent an inventory
        assert counter.count(command_topic("inst-b", 0)) == 0


def test_a_range_no_longer_retained_falls_back_to_a_resync_of_that_worker_only(nats_url: str, make_instance) -> None:
    with _started(nats_url, grace=1.0) as runner:
        # a keeps its latest batch only
        a, b = _indexed_instances(runner, make_instance, "inst-a", "inst-b", worker_replay_batches=1)
        with counting(nats_url) as counter:
            faulty = a.inject_faults(FaultPlan("drop"))
            a.store(MORE)
            wait_for(lambda: faulty.dropped, what="the batch to be dropped")
            a.store(EVEN_MORE)  # pushes the lost one out of what a retains
            _indexed(runner, a, b)
        assert _metric(runner, "replays") >= 1 and _metric(runner, "resyncs") == 1
        assert counter.resets[events_topic("inst-a", 0)] >= 1
        assert counter.resets[events_topic("inst-b", 0)] == 0
        assert counter.count(command_topic("inst-b", 0)) == 0


def _wait_for_stderr(proc: subprocess.Popen, needle: str, timeout: float = WAIT) -> str:
    """The first stderr line of ``proc`` containing ``needle`` (a test failure after ``timeout``)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        text += chunk.decode("utf-8", "replace")
        for line in text.splitlines():
            if needle in line:
                return line
    raise AssertionError(f"no stderr line with {needle!r} within {timeout:g}s; got {text[-500:]!r}")


def test_a_paused_worker_never_carries_out_a_clear_answered_504(nats_url: str, tmp_path: Path) -> None:
    settings = dict(controller_command_timeout=1.0, controller_heartbeat_timeout=120.0)
    with _started(nats_url, grace=1.0, **settings) as runner, counting(nats_url) as counter:
        inst = InstanceProcess(nats_url, tmp_path, disk=False)
        try:
            stored = inst.ready["stored_tokens"]
            wait_for(lambda: runner.lookup(PROMPT) == {INSTANCE: [CPU, stored]}, what="the instance indexed")
            inst.kill(signal.SIGSTOP)
            try:
                response = runner.client.post("/clear", json={"instance_id": INSTANCE, "location": CPU})
                assert response.status_code == 504, response.text
            finally:
                inst.kill(signal.SIGCONT)
            line = _wait_for_stderr(inst.proc, "after its deadline")
            assert "clear" in line
            # a heartbeat sent after it read the command still counts what it holds
            topic = f"heartbeat.{INSTANCE}.0"
            beats = counter.count(topic)
            wait_for(lambda: counter.count(topic) >= beats + 2, what="heartbeats after the pause")
            assert counter.last_beat[topic].chunks[CPU] > 0
            assert runner.lookup(PROMPT) == {INSTANCE: [CPU, stored]}
        finally:
            inst.close()


def test_random_drops_delays_duplicates_and_reorders_converge_by_replays_alone(nats_url: str, make_instance) -> None:
    rng = random.Random(8)
    first_sight: set[bytes] = set()

    def transient(topic: str, payload: bytes) -> str:
        """A fault for a batch's first trip only: what is published again (a replay) passes."""
        if not topic.startswith("events.") or payload in first_sight:
            return "pass"
        first_sight.add(payload)
        return rng.choices(["pass", "drop", "hold", "duplicate"], [5, 1, 2, 1])[0]

    with _started(nats_url, grace=0.5) as runner:
        [a] = _indexed_instances(runner, make_instance, "inst-a")
        faulty = a.inject_faults(transient)
        for step in range(24):
            tokens = [1000 + 8 * step + i for i in range(8)]
            a.store(tokens, seed=step)
            if step % 3 == 2:
                a.engine.remove([1000 + 8 * (step - 1) + i for i in range(8)])
            a.sync()
            if rng.random() < 0.3:
                a.on_worker_loop(faulty.release, rng.random() < 0.5)  # late, maybe reordered
        a.on_worker_loop(faulty.release, True)
        _indexed(runner, a)
        assert faulty.dropped and _metric(runner, "replays") >= 1 and _metric(runner, "late_batches_applied") >= 1
        assert _metric(runner, "resyncs") == 0
