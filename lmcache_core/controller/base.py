"""The state the controller's parts share, and the identity check every bus handler makes.

``Controller`` (``state.py``) is ``Registry`` + ``EventApplication`` + ``Recovery`` + ``Commands`` over one
``ControllerBase``: each part is a mixin in its own module, and this class is the one place
that lists what they share and which part changes it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from pydantic import ValidationError

from lmcache_core.config import LMCacheSettings
from lmcache_core.controller.activity import Activity
from lmcache_core.controller.feed import EventFeed
from lmcache_core.controller.index import KVIndex
from lmcache_core.controller.layout import LayoutTable
from lmcache_core.controller.metrics import ControllerMetrics
from lmcache_core.controller.records import EventLog, HashingGroup, HashingKey, HolderMeta, LocationState, WorkerState
from lmcache_core.errors import TransportError
from lmcache_core.transport import Message, MessageBus, Subscription
from lmcache_core.wire import WireModel, WorkerIdentity

log = logging.getLogger(__name__)

_Claim = TypeVar("_Claim", bound=WorkerIdentity)


class ControllerBase:
    """Shared state of the controller's parts (one event loop; no lock is held across an await)."""

    def __init__(
        self,
        settings: LMCacheSettings,
        bus: MessageBus,
        index: KVIndex | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.index = index if index is not None else KVIndex()
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        #: event ids handed out (commands, lookups), for /check_finish
        self.events = EventLog()
        self.feed = EventFeed()  # what the web page shows live
        self.activity = Activity(self.metrics.request_latency)  # the page's rates
        self._tg: TaskGroup | None = None
        self._subscriptions: list[Subscription] = []
        # --- the registry's (registry.py) ---
        self.workers: dict[tuple[str, int], WorkerState] = {}
        self.instances: dict[str, dict[int, WorkerState]] = {}
        #: holder id -> what lookups need about it, precomputed so the hot loop reads tuples
        self._holders: dict[int, HolderMeta] = {}
        self._groups: dict[HashingKey, HashingGroup] = {}
        #: what lookups need about every live holder, as arrays
        self._layout = LayoutTable()
        #: (instance, rank, epoch) of an unknown run -> when it was last asked to register (or
        #: first heard)
        self._asked: OrderedDict[tuple[str, int, str], float] = OrderedDict()
        #: monotonic time of the latest hello to every worker (None: none yet)
        self._hello_at: float | None = None
        #: rank -> epoch of its latest refused registration (one entry per rank at most)
        self._refused: dict[tuple[str, int], str] = {}
        self._heartbeat_subscription: Subscription | None = None
        # --- the recovery's (recovery.py) ---
        #: locations whose inventory is to be pulled, oldest first, and an event set when one is added
        self._to_pull: deque[tuple[WorkerState, LocationState]] = deque()
        self._pull_wanted: anyio.Event | None = None
        # --- the event application's (apply.py) ---
        self._events_subscription: Subscription | None = None
        #: event-batch messages handled so far, and an event set when that count moves
        self._events_handled = 0
        self._events_progress: anyio.Event | None = None
        self.metrics.watch(self._metrics_snapshot)

    def _metrics_snapshot(self) -> dict[str, Any]:
        locations: dict[str, tuple[int, int]] = {}
        for meta in self._holders.values():
            loc = meta.loc
            chunks, tokens = self.index.holder_stats(loc.holder)
            old = locations.get(loc.name, (0, 0))
            locations[loc.name] = (old[0] + chunks, old[1] + tokens)
        return {
            "workers": len(self.workers),
            "instances": len(self.instances),
            "locations": locations,
            "entries": self.index.num_entries(),
        }

    def _decode_claim(
        self, msg: Message, model: type[_Claim], topic_of: Callable[[str, int], str], what: str
    ) -> _Claim | None:
        """``msg`` as ``model`` when it parses and names the worker its topic names; else None
        (logged)."""
        try:
            claim = model.decode(msg.payload)
        except ValidationError as exc:
            log.warning("ignoring a malformed %s on %s: %s", what, msg.topic, exc)
            return None
        if not self._claims_its_topic(msg, topic_of(claim.instance_id, claim.worker_id), what, claim):
            return None
        return claim

    def _claims_its_topic(self, msg: Message, expected: str, what: str, claim: Any) -> bool:
        """Whether ``msg`` arrived on the topic of the identity it claims; logs a refusal if not."""
        if msg.topic == expected:
            return True
        self.metrics.identity_refused.labels(what).inc()
        log.warning(
            "refused the %s on '%s': it claims to be %s/%s, whose topic is '%s'",
            what, msg.topic, claim.instance_id, claim.worker_id, expected,
        )
        return False

    async def _respond(self, msg: Message, model: WireModel) -> None:
        try:
            await msg.respond(model.encode())
        except TransportError as exc:
            log.warning("cannot answer on %s: %s", msg.topic, exc)

