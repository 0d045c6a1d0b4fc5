"""``lmcache nats``: talk to workers directly over the message bus, without a controller.

    lmcache nats workers                       # who is out there (listens to heartbeats)
    lmcache nats lookup --instance I --tokens 1,2,3
    lmcache nats clear --instance I --location LocalCPUBackend
    lmcache nats watch --count 10 --json       # decoded event batches and heartbeats

``--url`` defaults to the settings' ``controller_url`` / ``controller_pull_url`` (the
controller's ``--monitor-port``), else ``localhost:9001``. ``--json`` prints machine-readable
output. Errors go to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

from lmcache_core.errors import LMCacheError, NoResponders, RequestTimeout
from lmcache_core.events import EventKind
from lmcache_core.transport import Message, MessageBus
from lmcache_core.wire import (
    EVENTS_WILDCARD,
    HEARTBEAT_WILDCARD,
    ClearCommand,
    Command,
    CommandReply,
    CommandRequest,
    EventBatch,
    Heartbeat,
    LookupCommand,
    PingCommand,
    command_topic,
    topic_token,
)

DEFAULT_URL = "localhost:9001"
_KIND_NAMES = {int(kind): kind.name.lower() for kind in EventKind}


class CommandFailed(LMCacheError):
    """A worker answered a command with an error."""


# --- plumbing -------------------------------------------------------------------------------------


def parse_tokens(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``, for argparse (``ArgumentTypeError`` on anything else)."""
    try:
        tokens = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not tokens:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return tokens


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _connect_and_run(
    args: argparse.Namespace, body: Callable[[MessageBus, Any], Awaitable[int]]
) -> int:
    """Load settings, connect to the bus, run ``body(bus, settings)``; the bus is closed after."""
    from lmcache_core.config import load_settings
    from lmcache_core.plugins import get_plugin_manager, resolve_transport

    pm = get_plugin_manager()
    settings = load_settings(pm)
    args.url = args.url or settings.controller_address or DEFAULT_URL
    if args.timeout is None:
        args.timeout = settings.controller_command_timeout
    spec = resolve_transport(pm, settings.transport)

    async def main() -> int:
        with anyio.fail_after(max(args.timeout, 1.0) + 5.0):
            bus = await spec.connect(settings, args.url)
        async with bus:
            return await body(bus, settings)

    try:
        return anyio.run(main)
    except TimeoutError:
        raise LMCacheError(f"could not connect to the message bus at {args.url} in time") from None


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data) if args.json else human, flush=True)


async def _command(
    bus: MessageBus, args: argparse.Namespace, instance: str, rank: int, command: Command
) -> CommandReply:
    """Send one command to one worker; transport problems become messages naming the worker."""
    topic = command_topic(instance, rank)
    # a worker that reads it after we gave up drops it (a late clear would surprise the user)
    request = CommandRequest(event_id=uuid.uuid4().hex, command=command, deadline=time.time() + args.timeout)
    try:
        payload = await bus.request(topic, request.encode(), timeout=args.timeout)
    except NoResponders:
        raise NoResponders(
            f"no worker answers for instance '{instance}' rank {rank} on {args.url} "
            f"(is it running with enable_controller and this controller_url?)"
        ) from None
    except RequestTimeout:
        raise RequestTimeout(
            f"instance '{instance}' rank {rank} did not answer within {args.timeout:g}s"
        ) from None
    try:
        return CommandReply.decode(payload)
    except ValueError as exc:
        raise LMCacheError(
            f"instance '{instance}' rank {rank} sent an unreadable reply: {exc}"
        ) from None


async def _ranks(bus: MessageBus, args: argparse.Namespace) -> list[int]:
    """The ranks to address: ``--worker``, else every rank of the world rank 0 reports."""
    if args.worker is not None:
        return [args.worker]
    reply = await _command(bus, args, args.instance, 0, PingCommand())
    world = reply.registration.world_size if reply.registration is not None else 1
    return list(range(world))


async def _each_rank(
    bus: MessageBus, args: argparse.Namespace, command: Command
) -> list[CommandReply]:
    """Send ``command`` to every addressed rank concurrently; raise if any of them refused it."""
    ranks = await _ranks(bus, args)
    replies: dict[int, CommandReply] = {}

    async def one(rank: int) -> None:
        replies[rank] = await _command(bus, args, args.instance, rank, command)

    async with anyio.create_task_group() as tg:
        for rank in ranks:
            tg.start_soon(one, rank)
    ordered = [replies[rank] for rank in ranks]
    failed = [reply for reply in ordered if not reply.ok]
    if failed:
        raise CommandFailed("; ".join(f"rank {r.worker_id}: {r.error}" for r in failed))
    return ordered


def _reply_json(reply: CommandReply) -> dict[str, Any]:
    return reply.model_dump(mode="json", exclude_none=True, exclude={"version"})


# --- lookup and clear -----------------------------------------------------------------------------


def _on_every_rank(
    args: argparse.Namespace,
    command: Command,
    line: Callable[[CommandReply], str],
    summary: Callable[[list[CommandReply]], dict[str, Any]],
) -> int:
    """Run ``command`` on the addressed ranks; print a line per rank, or ``summary`` as JSON."""

    async def body(bus: MessageBus, settings: Any) -> int:
        replies = await _each_rank(bus, args, command)
        data = {
            "instance_id": args.instance,
            **summary(replies),
            "workers": [_reply_json(r) for r in replies],
        }
        _emit(args, data, "\n".join(f"{args.instance}/{r.worker_id}: {line(r)}" for r in replies))
        return 0

    return _connect_and_run(args, body)


def _cmd_lookup(args: argparse.Namespace) -> int:
    return _on_every_rank(
        args,
        LookupCommand(tokens=args.tokens),
        lambda r: (
            f"{r.num_tokens} of {len(args.tokens)} tokens"
            + (f" (most in {r.location})" if r.location else "")
        ),
        # an instance holds the prefix every one of its ranks holds
        lambda replies: {
            "num_tokens": min(r.num_tokens or 0 for r in replies),
            "location": replies[0].location,
        },
    )


def _cmd_clear(args: argparse.Namespace) -> int:
    return _on_every_rank(
        args,
        ClearCommand(location=args.location),
        lambda r: f"cleared {r.num_tokens} tokens from {args.location}",
        lambda replies: {
            "location": args.location,
            "num_tokens": sum(r.num_tokens or 0 for r in replies),
        },
    )


# --- workers --------------------------------------------------------------------------------------


def _cmd_workers(args: argparse.Namespace) -> int:
    async def body(bus: MessageBus, settings: Any) -> int:
        listen = (
            args.listen if args.listen is not None else 2 * settings.worker_heartbeat_interval + 0.2
        )
        beats: dict[tuple[str, int], Heartbeat] = {}

        async def on_beat(msg: Message) -> None:
            try:
                beat = Heartbeat.decode(msg.payload)
            except ValueError:
                return  # not ours to judge here; `watch` shows malformed messages
            if args.instance is None or beat.instance_id == args.instance:
                beats[(beat.instance_id, beat.worker_id)] = beat

        sub = await bus.subscribe(HEARTBEAT_WILDCARD, on_beat)
        await anyio.sleep(listen)
        await sub.unsubscribe()

        # heartbeats say who is alive; a ping to each adds what it registered with
        details: dict[tuple[str, int], CommandReply] = {}

        async def ping(ident: tuple[str, int]) -> None:
            try:
                details[ident] = await _command(bus, args, ident[0], ident[1], PingCommand())
            except LMCacheError:
                pass  # listed from its heartbeat alone

        async with anyio.create_task_group() as tg:
            for ident in beats:
                tg.start_soon(ping, ident)

        rows = []
        for ident in sorted(beats):
            beat = beats[ident]
            reg = details[ident].registration if ident in details else None
            rows.append(
                {
                    "instance_id": beat.instance_id,
                    "worker_id": beat.worker_id,
                    "epoch": beat.epoch,
                    "model_name": reg.model_name if reg else None,
                    "world_size": reg.world_size if reg else None,
                    "locations": reg.locations if reg else sorted(beat.chunks),
                    "chunks": beat.chunks,
                    "last_seq": beat.last_seq,
                    "host": reg.host if reg else None,
                    "pid": reg.pid if reg else None,
                }
            )
        if args.json:
            print(json.dumps(rows), flush=True)
        elif not rows:
            print(f"no workers heard on {args.url} within {listen:g}s", flush=True)
        else:
            for row in rows:
                where = ", ".join(
                    f"{loc}={row['chunks'].get(loc, 0)} chunks" for loc in row["locations"]
                )
                who = f"{row['instance_id']}/{row['worker_id']}"
                extra = (
                    f" model={row['model_name']} host={row['host']} pid={row['pid']}"
                    if row["model_name"]
                    else ""
                )
                print(f"{who}: {where}{extra}", flush=True)
        return 0

    return _connect_and_run(args, body)


# --- watch ----------------------------------------------------------------------------------------


def describe_batch(batch: EventBatch, verbose: bool) -> tuple[dict[str, Any], str]:
    """An event batch as a JSON-able dict and a human-readable text."""
    kinds, hashes, tokens = batch.arrays()
    counts = {name: int(np.count_nonzero(kinds == value)) for value, name in _KIND_NAMES.items()}
    events = [
        {"kind": _KIND_NAMES.get(int(k), str(int(k))), "hash": f"{int(h):016x}", "tokens": int(t)}
        for k, h, t in zip(kinds, hashes, tokens, strict=True)
    ]
    data = {
        "type": "events",
        "instance_id": batch.instance_id,
        "worker_id": batch.worker_id,
        "epoch": batch.epoch,
        "location": batch.location,
        "seq": batch.seq,
        "reset": batch.reset,
        "counts": counts,
        "events": events,
    }
    summary = ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "no events"
    text = (
        f"events    {batch.instance_id}/{batch.worker_id} {batch.location} seq={batch.seq}"
        f"{' reset' if batch.reset else ''}: {summary}"
    )
    if verbose:
        text += "".join(f"\n  {e['kind']:<5} {e['hash']} {e['tokens']} tokens" for e in events)
    return data, text


def describe_heartbeat(beat: Heartbeat) -> tuple[dict[str, Any], str]:
    """A heartbeat as a JSON-able dict and a human-readable text."""
    data = {"type": "heartbeat", **beat.model_dump(mode="json", exclude={"version"})}
    where = ", ".join(
        f"{loc}: {beat.chunks.get(loc, 0)} chunks, seq {beat.last_seq.get(loc, 0)}"
        for loc in sorted(set(beat.chunks) | set(beat.last_seq))
    )
    return data, f"heartbeat {beat.instance_id}/{beat.worker_id}: {where or 'no locations'}"


def _cmd_watch(args: argparse.Namespace) -> int:
    async def body(bus: MessageBus, settings: Any) -> int:
        done = anyio.Event()
        seen = 0
        prefix = None if args.instance is None else topic_token(args.instance)

        async def show(msg: Message) -> None:
            nonlocal seen
            if done.is_set():
                return
            if prefix is not None and msg.topic.split(".")[1:2] != [prefix]:
                return
            try:
                if msg.topic.startswith("events."):
                    data, text = describe_batch(EventBatch.decode(msg.payload), args.verbose)
                else:
                    data, text = describe_heartbeat(Heartbeat.decode(msg.payload))
            except ValueError as exc:
                data = {"type": "malformed", "topic": msg.topic, "error": str(exc).splitlines()[0]}
                text = f"malformed message on {msg.topic}: {data['error']}"
            data["received_at"] = time.time()
            _emit(args, data, text)
            seen += 1
            if args.count is not None and seen >= args.count:
                done.set()

        await bus.subscribe(EVENTS_WILDCARD, show)
        if not args.no_heartbeats:
            await bus.subscribe(HEARTBEAT_WILDCARD, show)
        await bus.flush()
        # on stderr, so scripts reading stdout see only messages, yet know when we listen
        print(f"watching {args.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        await done.wait()
        return 0

    try:
        return _connect_and_run(args, body)
    except KeyboardInterrupt:  # the normal way to stop watching
        return 0


# --- parser ---------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmcache nats`` and its subcommands to the ``lmcache`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"message bus address (default: controller_url from the settings, else {DEFAULT_URL})",
    )
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    common.add_argument(
        "--timeout",
        type=_positive,
        default=None,
        help="seconds to wait for a worker's answer (default: controller_command_timeout)",
    )
    targeted = argparse.ArgumentParser(add_help=False)
    targeted.add_argument("--instance", required=True, help="lmcache_instance_id of the instance")
    targeted.add_argument(
        "--worker",
        type=int,
        default=None,
        help="one rank only (default: every rank of the instance)",
    )

    nats = subparsers.add_parser(
        "nats",
        help="talk to workers over the message bus",
        description="Talk to workers directly over the message bus, without a controller.",
    )
    sub = nats.add_subparsers(dest="nats_command", required=True, metavar="SUBCOMMAND")

    workers = sub.add_parser("workers", parents=[common], help="list workers heard on the bus")
    workers.add_argument("--instance", default=None, help="only this instance")
    workers.add_argument(
        "--listen",
        type=_positive,
        default=None,
        help="seconds to listen for heartbeats (default: two heartbeat intervals)",
    )
    workers.set_defaults(func=_cmd_workers)

    lookup = sub.add_parser(
        "lookup", parents=[common, targeted], help="ask how much of a prompt is stored"
    )
    lookup.add_argument("--tokens", type=parse_tokens, required=True, help="token ids, e.g. 1,2,3")
    lookup.set_defaults(func=_cmd_lookup)

    clear = sub.add_parser(
        "clear", parents=[common, targeted], help="empty one location of an instance"
    )
    clear.add_argument("--location", required=True, help="location name, e.g. LocalCPUBackend")
    clear.set_defaults(func=_cmd_clear)

    watch = sub.add_parser(
        "watch", parents=[common], help="print event batches and heartbeats live"
    )
    watch.add_argument("--instance", default=None, help="only this instance")
    watch.add_argument("--count", type=int, default=None, help="stop after this many messages")
    watch.add_argument("--no-heartbeats", action="store_true", help="show event batches only")
    watch.add_argument("-v", "--verbose", action="store_true", help="one line per event, too")
    watch.set_defaults(func=_cmd_watch)
