"""Model-based: hypothesis drives one controller and several real workers over a real
nats-server, each worker's batches through a fault-injecting bus (delay, drop, duplicate,
reorder), with worker restarts. After quiescence the controller's index equals the union of what
the workers hold, and full resyncs stay within a stated bound: at most one per injected fault
(a lost batch is normally replayed from what the worker retains, costing none)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from lmcache_core.testing import FaultPlan, FaultyBus

from .support import ControllerRunner, Instance, controller_settings, wait_for

pytestmark = pytest.mark.timeout(300)

NAMES = ("inst-a", "inst-b", "inst-c")
FAULTS = st.lists(st.sampled_from(["pass", "drop", "duplicate", "hold"]), min_size=1, max_size=3)


def _prompt(n: int) -> list[int]:
    return [1000 + 8 * n + i for i in range(8)]


def test_the_index_equals_the_workers_after_faults_and_restarts(nats_url: str, tmp_path: Path) -> None:
    examples = itertools.count()

    class Fleet(RuleBasedStateMachine):
        """The model: what each worker holds is what its engine reports; the index must follow."""

        def __init__(self) -> None:
            super().__init__()
            self.runner = ControllerRunner(nats_url, controller_settings(controller_gap_grace=0.3)).start()
            self.instances: dict[str, Instance] = {}
            self.faulty: dict[str, FaultyBus] = {}
            self.plans: dict[str, FaultPlan] = {}
            self.faults = 0
            self.prompts = 0
            self.example = next(examples)

        def _start(self, name: str) -> None:
            # a restarted worker keeps its disk: its inventory starts with what is there
            self.instances[name] = Instance(nats_url, name, tmp_path / f"{self.example}-{name}")
            self.instances[name].sync()  # registered, its (empty) inventory sent
            self.plans[name] = plan = FaultPlan()
            self.faulty[name] = self.instances[name].inject_faults(plan)

        @initialize()
        def start_fleet(self) -> None:
            for name in NAMES:
                self._start(name)

        @rule(name=st.sampled_from(NAMES), faults=FAULTS)
        def store_through_faults(self, name: str, faults: list[str]) -> None:
            """Store a prompt; its batch (and whatever the worker publishes next) meets ``faults``."""
            self.plans[name].actions.extend(faults)
            self.faults += sum(f != "pass" for f in faults)
            self.prompts += 1
            self.instances[name].store(_prompt(self.prompts), seed=self.prompts)
            self.instances[name].sync()  # published: into the faults

        @rule(name=st.sampled_from(NAMES), reverse=st.booleans())
        def release_held(self, name: str, reverse: bool) -> None:
            inst = self.instances[name]
            inst.on_worker_loop(self.faulty[name].release, reverse)  # late, perhaps reordered

        @rule(name=st.sampled_from(NAMES))
        def restart(self, name: str) -> None:
            inst = self.instances.pop(name)
            inst.on_worker_loop(self.faulty[name].release)  # nothing stays held forever
            inst.close()
            self._start(name)

        def teardown(self) -> None:
            try:
                if len(self.instances) == len(NAMES):
                    self.quiesce_and_check()
            finally:
                for inst in self.instances.values():
                    inst.close()
                self.runner.stop()

        def quiesce_and_check(self) -> None:
            expected: dict = {}
            for name, inst in self.instances.items():
                self.plans[name].actions.clear()  # the faults end
                inst.on_worker_loop(self.faulty[name].release)
                inst.sync()
                expected.update(inst.inventory_counts())
            wait_for(lambda: self.runner.holder_counts() == expected, what="the index to equal the workers")
            resyncs = self.runner.call(lambda: self.runner.controller.metrics.resyncs._value.get())
            assert resyncs <= self.faults, f"{resyncs} resyncs for {self.faults} injected faults"

    run_state_machine_as_test(
        Fleet,
        settings=settings(
            max_examples=8, stateful_step_count=12, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
