"""The web page's server side: the event feed (bounded fan-out, tallies, replay by id), the
rolling rates, ``/page/summary`` and ``/page/events`` over real HTTP with the API token, and
the page's files served without it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import anyio
import httpx
import numpy as np
import pytest

from lmcache_core.controller.activity import Activity
from lmcache_core.controller.feed import MAX_PENDING_BATCHES, EventFeed, TooManySubscribersError
from lmcache_core.controller.metrics import ControllerMetrics
from lmcache_core.controller.server import SHUTDOWN_GRACE
from lmcache_core.events import EventKind

from .support import PROMPT, WAIT, ControllerRunner, controller_settings, wait_for

pytestmark = pytest.mark.timeout(180)

TOKEN = "page-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIT, EVICT, CLEAR = int(EventKind.ADMIT), int(EventKind.EVICT), int(EventKind.CLEAR)


def _batch(*kinds_and_tokens: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    kinds = np.array([k for k, _ in kinds_and_tokens], dtype=np.uint8)
    tokens = np.array([t for _, t in kinds_and_tokens], dtype="<u4")
    return kinds, tokens


@pytest.mark.anyio
async def test_a_subscriber_that_falls_behind_is_dropped_and_publishing_never_waits() -> None:
    feed = EventFeed(buffer=3)
    slow = feed.subscribe()
    fast = feed.subscribe()
    started = time.perf_counter()
    for i in range(3):
        feed.publish("stored", f"event {i}")
    assert [(await fast.receive())["text"] for _ in range(3)] == ["event 0", "event 1", "event 2"]
    feed.publish("stored", "event 3")  # the slow one has 3 unread: it is dropped, the fast one is not
    assert time.perf_counter() - started < 0.5
    assert (feed.subscribers, feed.dropped) == (1, 1)
    assert [(await slow.receive())["text"] for _ in range(3)] == ["event 0", "event 1", "event 2"]
    with pytest.raises(anyio.EndOfStream):
        await slow.receive()  # its stream ends after what it had: the page reconnects
    assert (await fast.receive())["text"] == "event 3"
    await fast.aclose()
    assert feed.subscribers == 0


@pytest.mark.anyio
async def test_subscribers_are_bounded_and_a_closed_feed_ends_every_stream() -> None:
    feed = EventFeed(max_subscribers=2)
    first, second = feed.subscribe(), feed.subscribe()
    with pytest.raises(TooManySubscribersError, match="2 subscribers already"):
        feed.subscribe()
    feed.close()
    for stream in (first, second):
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
    assert feed.subscribers == 0


def test_batches_are_counted_each_second_per_instance_and_location_and_clears_per_rank() -> None:
    feed = EventFeed()
    feed.applied("inst-a", 0, "LocalCPUBackend", False, *_batch((ADMIT, 256), (ADMIT, 256), (EVICT, 256)))
    feed.applied("inst-a", 1, "LocalCPUBackend", False, *_batch((ADMIT, 256), (ADMIT, 100)))
    feed.applied("inst-a", 0, "LocalDiskBackend", True, *_batch((ADMIT, 256)))  # a resync's inventory
    feed.applied("inst-b", 0, "LocalCPUBackend", False, *_batch((ADMIT, 4), (CLEAR, 1000)))
    feed.applied("inst-b", 0, "LocalCPUBackend", False, *_batch())  # an empty batch counts nothing
    assert feed.last_id == 0  # nothing yet: the batches are counted by the flush
    feed.flush()
    assert [(e["kind"], e["text"]) for e in feed.recent] == [
        ("cleared", "inst-b/0 cleared LocalCPUBackend (1000 tokens)"),
        ("stored", "inst-a stored 4 chunks (868 tokens) at LocalCPUBackend over 2 ranks"),
        ("evicted", "inst-a evicted 1 chunk (256 tokens) at LocalCPUBackend over 2 ranks"),
        ("resynced", "inst-a resynced 1 chunk (256 tokens) at LocalDiskBackend"),
        ("stored", "inst-b stored 1 chunk (4 tokens) at LocalCPUBackend"),
    ]
    stored = feed.recent[1]
    assert (stored["instance_id"], stored["location"], stored["chunks"], stored["tokens"]) == (
        "inst-a", "LocalCPUBackend", 4, 868
    )
    feed.flush()
    assert len(feed.recent) == 5  # a flush with nothing new publishes nothing
    assert [e["id"] for e in feed.since(3)] == [4, 5]


def test_a_busy_second_is_counted_in_goes_of_bounded_size() -> None:
    feed = EventFeed()
    for _ in range(MAX_PENDING_BATCHES + 10):
        feed.applied("inst-a", 0, "LocalCPUBackend", False, *_batch((ADMIT, 256)))
    assert len(feed._pending) == 10  # the first MAX_PENDING_BATCHES were counted as they filled up
    feed.flush()
    (event,) = feed.recent
    assert (event["chunks"], event["tokens"]) == (MAX_PENDING_BATCHES + 10, (MAX_PENDING_BATCHES + 10) * 256)


def test_rates_are_per_interval_counts_of_lookups_hits_and_requests() -> None:
    metrics = ControllerMetrics()
    activity = Activity(metrics.request_latency, window=3)
    activity.sample(now=100.0)
    activity.note_lookup(10, {})
    # answers list the longest match first (as /lookup does)
    activity.note_lookup(12, {"inst-b": ["LocalDiskBackend", 12], "inst-a": ["LocalCPUBackend", 8]})
    for _ in range(3):
        metrics.request_latency.labels("/lookup").observe(0.001)
    metrics.request_latency.labels("/clear").observe(0.01)
    activity.sample(now=101.0)
    activity.note_lookup(4, {"inst-a": ["LocalCPUBackend", 4]})
    activity.sample(now=102.5)
    series = activity.series()
    assert series["time"] == [101.0, 102.5]
    assert series["seconds"] == [1.0, 1.5]
    assert series["lookups"] == [2, 1]
    assert series["hits"] == [1, 1]
    assert series["tokens"] == [22, 4]
    assert series["matched"] == [12, 4]  # the longest prefix any instance holds
    assert series["requests"] == [4, 0]
    assert series["routes"] == {"/lookup": 3, "/clear": 1}
    for now in (103.0, 104.0, 105.0):
        activity.sample(now=now)
    assert activity.series()["time"] == [103.0, 104.0, 105.0]  # the window keeps 3 intervals


@pytest.fixture
def guarded(nats_url: str) -> Iterator[ControllerRunner]:
    with ControllerRunner(nats_url, controller_settings(controller_api_token=TOKEN)) as runner:
        yield runner


def test_the_page_is_served_without_the_token_and_its_data_only_with_it(guarded: ControllerRunner) -> None:
    client = guarded.client
    for path, kind in [("/", "text/html"), ("/page/app.js", "text/javascript"), ("/page/style.css", "text/css")]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind)
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    linked = re.findall(r'(?:src|href)="([^"]+)"', client.get("/").text)
    assert "/page/app.js" in linked and all(url.startswith("/") for url in linked)  # nothing from elsewhere
    for path in ["/page/summary", "/page/events", "/docs", "/instances"]:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert client.post("/", headers={}).status_code == 401  # only a GET of the page's files is open
    assert client.get("/page/summary", headers=AUTH).status_code == 200


def read_events(lines: Iterator[str], until: Callable[[dict], bool], timeout: float = WAIT) -> list[dict]:
    """Events from the lines of an open ``/page/events`` response, up to the first one ``until``
    accepts (an AssertionError past ``timeout`` seconds, checked at each message and keep-alive)."""
    deadline = time.monotonic() + timeout
    events: list[dict] = []
    block: list[str] = []
    for line in lines:
        if line:
            block.append(line)
            continue
        data = [part[6:] for part in block if part.startswith("data: ")]
        kind = next((part[7:] for part in block if part.startswith("event: ")), None)
        block = []
        if data and kind != "closed":
            events.append(json.loads(data[0]))
            if until(events[-1]):
                return events
        assert time.monotonic() < deadline, f"no such event within {timeout:g}s; got {events}"
    raise AssertionError(f"the stream ended; got {events}")


def test_the_feed_streams_worker_events_live_and_replays_by_id(guarded: ControllerRunner, make_instance) -> None:
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=30) as client:
        with client.stream("GET", "/page/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            inst = make_instance("inst-feed")
            registered = read_events(lines, lambda e: e["kind"] == "registered")[-1]
            assert (registered["instance_id"], registered["worker_id"]) == ("inst-feed", 0)
            inst.sync()  # its (empty) inventory is in: what follows is stored live
            inst.store(PROMPT)  # 3 chunks of 4 tokens in each location
            inst.sync()
            stored: dict[str, tuple[int, int]] = {}

            def both_stored(event: dict) -> bool:
                if event["kind"] == "stored":
                    stored[event["location"]] = (event["chunks"], event["tokens"])
                return len(stored) == 2

            last_id = read_events(lines, both_stored)[-1]["id"]
            assert stored == {"LocalCPUBackend": (3, 12), "LocalDiskBackend": (3, 12)}
        wait_for(lambda: guarded.call(lambda: guarded.controller.feed.subscribers) == 0, what="the closed stream unsubscribed")
        cleared = client.post("/clear", json={"instance_id": "inst-feed", "location": "LocalCPUBackend"})
        assert cleared.status_code == 200, cleared.text
        with client.stream("GET", f"/page/events?since={last_id}") as response:
            (event,) = read_events(response.iter_lines(), lambda e: True)  # what happened since: the clear
            assert event["id"] > last_id
            assert (event["kind"], event["location"], event["tokens"]) == ("cleared", "LocalCPUBackend", 12)
        assert client.get("/page/events?since=-1").status_code == 422


def test_the_summary_has_counts_capacity_and_lookup_rates(guarded: ControllerRunner, make_instance) -> None:
    inst = make_instance("inst-sum")
    inst.store(PROMPT)
    inst.sync()
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=30) as client:
        assert client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"]
        assert client.post("/lookup", json={"tokens": [7, 7, 7, 7, 7]}).json()["layout_info"] == {}
        stats = inst.engine.stats()

        def summary_with_usage() -> dict | None:
            body = client.get("/page/summary").json()
            activity = body["activity"]
            locations = body["instances"][0]["workers"][0]["locations"] if body["instances"] else []
            done = sum(activity["lookups"]) == 2 and locations and locations[0]["used_bytes"] is not None
            return body if done else None

        body = wait_for(summary_with_usage, what="the lookups sampled and a heartbeat with bytes")
    assert body["totals"] == {"instances": 1, "workers": 1, "chunks": 6, "tokens": 24, "index_entries": 6}
    (instance,) = body["instances"]
    assert (instance["instance_id"], instance["chunks"], instance["tokens"]) == ("inst-sum", 6, 24)
    locations = {loc["name"]: loc for loc in instance["workers"][0]["locations"]}
    for name in ("LocalCPUBackend", "LocalDiskBackend"):
        assert (locations[name]["chunks"], locations[name]["tokens"]) == (3, 12)
        assert locations[name]["capacity_bytes"] == stats[name]["capacity_bytes"] > 0
        assert 0 < locations[name]["used_bytes"] <= locations[name]["capacity_bytes"]
    activity = body["activity"]
    assert (sum(activity["hits"]), sum(activity["tokens"]), sum(activity["matched"])) == (1, len(PROMPT) + 5, 12)
    assert activity["routes"]["/lookup"] == 2


def test_an_open_feed_does_not_hold_up_the_controllers_shutdown(nats_url: str) -> None:
    runner = ControllerRunner(nats_url, controller_settings(controller_api_token=TOKEN)).start()
    with httpx.Client(base_url=runner.url, headers=AUTH, timeout=30) as client:
        with client.stream("GET", "/page/events") as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)  # connected
            started = time.monotonic()
            runner.stop()
            took = time.monotonic() - started
            assert "event: closed" in list(lines)  # the stream ended, saying so
    assert took < SHUTDOWN_GRACE, f"stopping took {took:.1f}s with a page open"


def test_the_feed_refuses_subscribers_beyond_its_bound_with_429(guarded: ControllerRunner) -> None:
    feed = guarded.controller.feed
    guarded.call(setattr, feed, "_max_subscribers", 1)
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=30) as client:
        with client.stream("GET", "/page/events") as response:
            lines = response.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)  # connected
            wait_for(lambda: guarded.call(lambda: feed.subscribers) == 1, what="the first subscriber")
            refused = client.get("/page/events")
            assert refused.status_code == 429
            assert "subscribers already" in refused.json()["detail"]
