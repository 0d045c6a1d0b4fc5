"""The operators' web page: ``GET /`` and its static files, the summary it polls and the live
event feed it streams, contributed through ``lmcache_controller_routes`` like every endpoint.

The page itself (``static/``: HTML, JavaScript, CSS, no build step, nothing fetched from
elsewhere) holds no data, so ``/`` and its files are served without the API token; every
request carrying data is an API call with the token as a bearer header. The feed is
``text/event-stream`` read by ``fetch`` (not ``EventSource``, which cannot send a header), so
the token never appears in a URL, a log line or a cookie.

``page_clock`` runs beside the controller (``server.running_controller`` starts it): once a
second it samples the rates (``activity.Activity``) and publishes what the event batches did
(``feed.EventFeed.flush``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from lmcache_core.controller.deps import get_controller
from lmcache_core.controller.feed import TooManySubscribersError
from lmcache_core.controller.models import InstanceInfo
from lmcache_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from lmcache_core.controller.state import Controller

#: the page's files, served from the package (name -> content type)
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: where the static files other than index.html are served
STATIC_PREFIX = "/page/"
#: events sent to a page that connects without ``since`` (it has shown nothing yet)
BACKLOG = 100
#: seconds between keep-alive comments on an idle feed (a gone client shows up as a failed write)
KEEPALIVE_SECONDS = 15.0
#: seconds between two samples of the rates and flushes of the feed's tallies
CLOCK_SECONDS = 1.0

_HEADERS = {
    # the page runs only its own script and talks only to this controller
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class PageLocation(BaseModel):
    name: str
    chunks: int
    tokens: int
    used_bytes: int | None = Field(None, description="Bytes the location uses (its latest heartbeat).")
    capacity_bytes: int | None = Field(None, description="Bytes it may use (its latest heartbeat).")


class PageWorker(BaseModel):
    worker_id: int
    host: str
    pid: int
    epoch: str
    kv_dtype: str
    chunk_size: int
    registration_time: float
    seconds_since_heartbeat: float | None
    locations: list[PageLocation] = Field(description="Fastest first.")


class PageInstance(InstanceInfo):
    """An instance as ``/instances`` shows it, its workers as the page shows them."""

    workers: list[PageWorker]  # type: ignore[assignment]


class PageActivity(BaseModel):
    """Per interval of about a second, oldest first (the last few minutes)."""

    time: list[float] = Field(description="Unix time each interval ended.")
    seconds: list[float] = Field(description="Length of each interval.")
    lookups: list[int]
    hits: list[int] = Field(description="Lookups some instance matched.")
    tokens: list[int] = Field(description="Tokens looked up.")
    matched: list[int] = Field(description="Tokens of the longest prefix found.")
    requests: list[int] = Field(description="HTTP requests, every route.")
    routes: dict[str, int] = Field(description="Requests per route over the last route_span_seconds.")
    route_span_seconds: float


class PageTotals(BaseModel):
    instances: int
    workers: int
    chunks: int
    tokens: int
    index_entries: int


class PageFeedInfo(BaseModel):
    last_id: int
    subscribers: int
    dropped: int = Field(description="Subscribers dropped for falling behind.")


class PageSummary(BaseModel):
    time: float
    totals: PageTotals
    instances: list[PageInstance]
    activity: PageActivity
    feed: PageFeedInfo


def summary(controller: Controller) -> dict[str, Any]:
    """What the page shows (``PageSummary``), read straight from the controller's state on its
    event loop: a few milliseconds for 100 instances."""
    index = controller.index
    now = time.monotonic()
    instances = []
    for instance_id in sorted(controller.instances):
        ranks = controller.instances[instance_id]
        workers = []
        for rank in sorted(ranks):
            worker = ranks[rank]
            reg = worker.registration
            beat = worker.last_beat
            used = beat.used_bytes if beat is not None else {}
            capacity = beat.capacity_bytes if beat is not None else {}
            locations = []
            for name, loc in worker.locations.items():
                chunks, tokens = index.holder_stats(loc.holder)
                locations.append({"name": name, "chunks": chunks, "tokens": tokens,
                                  "used_bytes": used.get(name), "capacity_bytes": capacity.get(name)})
            workers.append({
                "worker_id": rank, "host": reg.host, "pid": reg.pid, "epoch": reg.epoch, "kv_dtype": reg.kv_dtype,
                "chunk_size": reg.hashing.chunk_size, "registration_time": worker.registered_at,
                "seconds_since_heartbeat": round(now - worker.last_seen, 3), "locations": locations,
            })
        first = ranks[min(ranks)].registration
        instances.append({
            "instance_id": instance_id, "model_name": first.model_name, "world_size": first.world_size,
            "locations": controller.instance_locations(instance_id),
            "chunks": sum(loc["chunks"] for w in workers for loc in w["locations"]),
            "tokens": sum(loc["tokens"] for w in workers for loc in w["locations"]),
            "workers": workers,
        })
    feed = controller.feed
    return {
        "time": round(time.time(), 3),
        "totals": {
            "instances": len(instances),
            "workers": sum(len(i["workers"]) for i in instances),
            "chunks": sum(i["chunks"] for i in instances),
            "tokens": sum(i["tokens"] for i in instances),
            "index_entries": index.num_entries(),
        },
        "instances": instances,
        "activity": controller.activity.series(),
        "feed": {"last_id": feed.last_id, "subscribers": feed.subscribers, "dropped": feed.dropped},
    }


#: the last message of a stream the feed ended
_CLOSED = b"event: closed\ndata: {}\n\n"


def _sse(event: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event["id"], event["kind"].encode(), orjson.dumps(event))


async def _stream(controller: Controller, since: int | None) -> AsyncIterator[bytes]:
    """The feed as server-sent events: the backlog, then each event as it is published."""
    feed = controller.feed
    yield b": lmcache controller events\n\n"  # a first byte: the page knows it is connected
    try:
        subscription = feed.subscribe()
    except TooManySubscribersError:
        yield _CLOSED
        return
    # taken with no await in between: nothing is missed or sent twice
    backlog = feed.since(since) if since is not None else list(feed.recent)[-BACKLOG:]
    async with subscription:
        for event in backlog:
            yield _sse(event)
        while True:
            # no yield inside the cancel scope: the consumer's awaits must not run under it
            message = b": keep-alive\n\n"
            with anyio.move_on_after(KEEPALIVE_SECONDS):
                try:
                    message = _sse(await subscription.receive())
                except anyio.EndOfStream:
                    message = _CLOSED
            yield message
            if message is _CLOSED:
                return  # dropped (too slow) or the controller is stopping: the page reconnects


def _static(name: str) -> bytes:
    return (resources.files("lmcache_core.controller") / "static" / name).read_bytes()


def build_router() -> APIRouter:
    """``/`` and the page's files, ``/page/summary`` and ``/page/events``."""
    router = APIRouter()
    files = {name: _static(name) for name in STATIC_FILES}

    def serve(name: str) -> Any:
        body, media_type = files[name], STATIC_FILES[name]

        async def page_file() -> Response:
            return Response(body, media_type=media_type, headers=_HEADERS)

        page_file.lmcache_public = True  # type: ignore[attr-defined]  # no data: no token needed
        page_file.__doc__ = f"The operators' web page: {name} (served without the API token)."
        return page_file

    router.get("/", response_class=Response, include_in_schema=True, summary="The operators' web page")(
        serve("index.html")
    )
    for name in STATIC_FILES:
        if name != "index.html":
            router.get(STATIC_PREFIX + name, response_class=Response, include_in_schema=False)(serve(name))

    @router.get("/page/summary", response_model=PageSummary)
    async def page_summary(controller: Controller = Depends(get_controller)) -> Response:
        """Instances, workers and locations with counts and capacity used; rates of the last
        minutes; the feed's latest event id. What the web page polls."""
        # encoded here (the model documents it): FastAPI's validation would cost more than the summary
        return Response(orjson.dumps(summary(controller)), media_type="application/json")

    @router.get(
        "/page/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events, one per controller event."},
            429: {"description": "Every subscriber slot of the feed is taken."},
        },
    )
    async def page_events(
        since: int | None = Query(
            None, ge=0, description="Send the recent events after this id first (a reconnecting page); "
            f"none: the latest {BACKLOG}."
        ),
        controller: Controller = Depends(get_controller),
    ) -> StreamingResponse:
        """The controller's events as they happen (registrations, refusals, workers leaving or
        lost, chunks stored, evicted and resynced per second, clears), as server-sent events
        (``id``, ``event``: the kind, ``data``: JSON). A subscriber that falls behind is sent
        ``event: closed`` and dropped; reconnect with ``since`` set to the last id seen."""
        if controller.feed.full:
            raise HTTPException(429, f"the event feed has {controller.feed.subscribers} subscribers already; close a page and retry")
        return StreamingResponse(
            _stream(controller, since), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    return router


async def page_clock(controller: Controller, period: float = CLOCK_SECONDS) -> None:
    """Sample the rates and publish the feed's tallies every ``period`` seconds, forever."""
    while True:
        controller.activity.sample()
        controller.feed.flush()
        await anyio.sleep(period)


@hookimpl
def lmcache_controller_routes() -> list[Any]:
    return [build_router()]
