"""Bugs the model-based test (test_model_based.py) found, each pinned down on a real nats-server
with real workers: what went wrong, reproduced on purpose, and that it no longer does."""

from __future__ import annotations

import pytest

from lmcache_core.testing import FaultPlan
from lmcache_core.wire import HELLO_TOPIC, hello_topic, register_topic

from .support import PROMPT, ControllerRunner, controller_settings, counting, wait_for

pytestmark = pytest.mark.timeout(180)


def test_a_starting_controller_costs_each_worker_one_registration_when_heartbeats_overtake_it(
    controller: ControllerRunner, make_instance, nats_url: str
) -> None:
    """A starting controller's hello makes every worker register; a heartbeat that reaches it
    before that registration (a loaded host, a slow path) once got a hello of its own as well,
    and the worker registered and sent its whole inventory twice."""
    a = make_instance("inst-a")
    a.store(PROMPT)
    a.sync()
    # from now on its registrations reach any controller 0.6 s late: three heartbeats first
    a.inject_faults(FaultPlan(prefix=register_topic("inst-a", 0), then="delay", delay=0.6))
    before = a.worker.registrations
    with counting(nats_url) as counter, ControllerRunner(nats_url, controller_settings()) as second:
        expected = a.inventory_counts()
        wait_for(lambda: second.holder_counts() == expected, what="the new controller to index inst-a")
        beats = counter.count("heartbeat")
        # a second registration would follow the first within 0.6 s: give it 2 s of heartbeats
        wait_for(lambda: counter.count("heartbeat") >= beats + 10, what="ten more heartbeats")
        assert counter.count(hello_topic("inst-a", 0)) == 0  # nobody was asked alone
        assert counter.count(HELLO_TOPIC) == 1  # the new controller's hello, once
        assert a.worker.registrations == before + 1
        assert counter.resets["events.inst-a.0"] == len(expected)  # one inventory per location
        assert controller.holder_counts() == expected
