"""Bugs the model-based test (test_model_based.py) found, each pinned down on a real nats-server
with real workers: what went wrong, reproduced on purpose, and that it no longer does."""

from __future__ import annotations

import pytest

from lmcache_core.engine import CacheEngine
from lmcache_core.testing import FaultPlan, FaultyBus
from lmcache_core.transport import MessageBus
from lmcache_core.wire import HELLO_TOPIC, hello_topic, register_topic
from lmcache_core.worker import WorkerHandle

from .support import PROMPT, ControllerRunner, controller_settings, counting, metric, wait_for

pytestmark = pytest.mark.timeout(180)


class SlowToRegister(WorkerHandle):
    """A real worker whose every registration reaches the controllers ``delay`` seconds late,
    from its very first (its heartbeats go out meanwhile)."""

    def __init__(self, engine: CacheEngine, delay: float) -> None:
        super().__init__(engine)
        self.plan = FaultPlan(prefix=register_topic(self.identity.instance_id, self.identity.worker_id),
                              then="delay", delay=delay)

    async def _serve(self, bus: MessageBus) -> None:
        await super()._serve(FaultyBus(bus, self.plan))


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
        # one inventory per location, pulled by the new controller alone (nothing pushed to all)
        assert second.call(lambda: metric(second.controller, "inventories_pulled", "installed")) == len(expected)
        assert counter.resets["events.inst-a.0"] == 0
        assert controller.holder_counts() == expected


def test_a_starting_worker_whose_heartbeats_overtake_its_registration_registers_once(
    controller: ControllerRunner, make_instance, nats_url: str
) -> None:
    """A worker heartbeats while its first registration is on its way; a controller that heard a
    heartbeat first once asked that run alone to register as well, and it sent its inventory
    twice. An unknown run is asked only once it has been heard for a second unregistered."""
    clock = make_instance("inst-z")  # its heartbeats (every 0.2 s) time what follows
    clock.sync()
    a = make_instance("inst-a")
    a.store(PROMPT)
    a.sync()
    with counting(nats_url) as counter:
        # the controller's own hello (on start) is well past: a fresh run is heard unknown
        wait_for(lambda: counter.count("heartbeat.inst-z") >= 6, what="six heartbeats")
        pulled = controller.call(lambda: metric(controller.controller, "inventories_pulled", "installed"))
        a.worker.close()  # the instance restarts: a new run, whose registrations come 0.6 s late
        a.worker = SlowToRegister(a.engine, delay=0.6).start()
        expected = {**clock.inventory_counts(), **a.inventory_counts()}
        wait_for(lambda: a.worker.registrations == 1 and controller.holder_counts() == expected,
                 what="the new run to be indexed")
        beats = counter.count("heartbeat.inst-z")
        wait_for(lambda: counter.count("heartbeat.inst-z") >= beats + 10, what="ten more heartbeats")
        assert counter.count(hello_topic("inst-a", 0)) == 0  # nobody was asked alone
        assert a.worker.registrations == 1
        # one inventory per location, pulled once
        installed = controller.call(lambda: metric(controller.controller, "inventories_pulled", "installed"))
        assert installed - pulled == len(a.inventory_counts())
        assert controller.holder_counts() == expected
