"""Commands: what the controller asks of workers (``cmd.<inst>.<w>``, request/reply).

Every command carries a deadline (``controller_command_timeout`` from now): a worker that reads
it later does not carry it out, so a clear that answered 504 never happens afterwards. Every
reply must come from the worker asked. Each command runs under an event id that
``/check_finish`` reports. New commands go here: build the wire command, send it with
``_command`` (one rank), ``_fan_out`` (every rank of an instance) or ``_tracked_command`` (one
rank, under its own event id), and apply what the reply says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from pydantic import ValidationError

from lmcache_core.controller.base import ControllerBase
from lmcache_core.controller.errors import BadWorkerReplyError, WorkerUnavailableError, reply_error
from lmcache_core.controller.models import CheckFinishResponse, ClearResponse, HealthResponse
from lmcache_core.controller.records import WorkerState
from lmcache_core.errors import LMCacheError, NoResponders, RequestTimeout, TransportError, UnknownLocationError
from lmcache_core.wire import ClearCommand, CommandReply, CommandRequest, PingCommand, command_topic

log = logging.getLogger(__name__)


class Commands(ControllerBase):
    """Sending commands to one rank or every rank of an instance: clear, health, and the
    repairs ``apply.py`` asks for (replay, resync)."""

    async def _tracked_command(self, worker: WorkerState, command: Any, kind: str) -> CommandReply | None:
        """Send a command under a ``/check_finish`` id of ``kind``; its reply (None: no answer)."""
        event_id = self.events.start(kind)
        try:
            reply = await self._command(worker, command, event_id)
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            log.warning("%s of %s failed: %s", kind, worker.name, exc)
            return None
        self.events.finish(event_id, ok=reply.ok, detail=reply.error)
        return reply

    async def _command(self, worker: WorkerState, command: Any, event_id: str) -> CommandReply:
        """Send one command to one worker and read its reply."""
        timeout = self.settings.controller_command_timeout
        # past this the worker drops it: a command we gave up on is never carried out later
        payload = CommandRequest(event_id=event_id, command=command, deadline=time.time() + timeout).encode()
        topic = command_topic(worker.instance_id, worker.worker_id)
        try:
            # the outer bound keeps a misbehaving transport from hanging the request
            with anyio.fail_after(timeout + 1.0):
                raw = await self.bus.request(topic, payload, timeout)
        except (RequestTimeout, TimeoutError) as exc:
            raise WorkerUnavailableError(
                f"worker {worker.name} did not answer within {timeout:g} s"
            ) from exc
        except NoResponders as exc:
            raise WorkerUnavailableError(
                f"worker {worker.name} is not listening (no responders on its command topic)"
            ) from exc
        except TransportError as exc:
            raise WorkerUnavailableError(f"cannot reach worker {worker.name}: {exc}") from exc
        try:
            reply = CommandReply.decode(raw)
        except ValidationError as exc:
            raise BadWorkerReplyError(f"worker {worker.name} sent an unreadable reply: {exc}") from exc
        if (reply.instance_id, reply.worker_id) != (worker.instance_id, worker.worker_id):
            log.warning("refused a reply on '%s' from %s/%s", topic, reply.instance_id, reply.worker_id)
            raise BadWorkerReplyError(
                f"worker {worker.name} was answered for by {reply.instance_id}/{reply.worker_id}"
            )
        return reply

    async def _fan_out(
        self, ranks: list[WorkerState], command: Any, event_id: str
    ) -> tuple[dict[int, CommandReply], dict[int, LMCacheError]]:
        """Send ``command`` to every rank concurrently; replies and errors per rank."""
        return await self._fan_out_each([(worker, command) for worker in ranks], event_id)

    async def _fan_out_each(
        self, commands: list[tuple[WorkerState, Any]], event_id: str
    ) -> tuple[dict[int, CommandReply], dict[int, LMCacheError]]:
        """Send each rank its own command, all concurrently; replies and errors per rank."""
        replies: dict[int, CommandReply] = {}
        errors: dict[int, LMCacheError] = {}

        async def one(worker: WorkerState, command: Any) -> None:
            try:
                replies[worker.worker_id] = await self._command(worker, command, event_id)
            except LMCacheError as exc:
                errors[worker.worker_id] = exc

        async with anyio.create_task_group() as tg:
            for worker, command in commands:
                tg.start_soon(one, worker, command)
        return replies, errors


    @staticmethod
    def check_locations(available: list[str], names: list[str]) -> None:
        """``UnknownLocationError`` (listing ``available``) for the first of ``names`` not in it."""
        for name in names:
            if name not in available:
                raise UnknownLocationError(name, available)

    async def command_instance(
        self, instance_id: str, command: Any, locations: list[str],
        after: Callable[[dict[int, CommandReply]], Awaitable[None]] | None = None,
        kind: str | None = None,
    ) -> dict[str, Any]:
        """Send ``command`` to every rank of an instance under a ``/check_finish`` id of
        ``kind`` (default: its ``op``); ``after(replies)`` runs once every rank answered ok.
        Returns the answer's fields: ``event_id``, ``num_tokens`` summed over ranks, and
        ``num_tokens_per_worker`` when the ranks differ. ``locations`` must be the instance's
        (400 listing them otherwise); a rank's failed reply raises what ``reply_error`` makes
        of it."""
        ranks = self._ranks(instance_id)
        self.check_locations(self.instance_locations(instance_id), locations)
        kind = kind or command.op
        what = f"{kind} of '{command.location}' on instance '{instance_id}'"
        event_id = self.events.start(kind)
        try:
            replies, errors = await self._fan_out(ranks, command, event_id)
            if errors:
                raise WorkerUnavailableError(f"{what} failed: " + "; ".join(str(errors[r]) for r in sorted(errors)))
            for rank, reply in sorted(replies.items()):
                if not reply.ok:
                    raise reply_error(reply, f"{instance_id}/{rank}", what, command)
            if after is not None:
                await after(replies)
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            raise
        self.events.finish(event_id)
        per_rank = {rank: int(reply.num_tokens or 0) for rank, reply in sorted(replies.items())}
        differ = len(set(per_rank.values())) > 1
        return {
            "event_id": event_id,
            "num_tokens": sum(per_rank.values()),
            "num_tokens_per_worker": per_rank if differ else None,
        }

    async def clear(self, instance_id: str, location: str) -> ClearResponse:
        """Empty ``location`` on every rank of an instance; the index forgets it before returning.
        Pinned chunks are removed too (a pin protects from eviction, not from a clear)."""

        async def forget(replies: dict[int, CommandReply]) -> None:
            for rank, reply in replies.items():
                self._apply_clear(instance_id, rank, location, reply)

        return ClearResponse(**await self.command_instance(instance_id, ClearCommand(location=location), [location], forget))

    async def health(self, instance_id: str) -> HealthResponse:
        """Ping every rank of an instance."""
        ranks = self._ranks(instance_id)
        event_id = self.events.start("health")
        replies, errors = await self._fan_out(ranks, PingCommand(), event_id)
        codes = {w.worker_id: 0 for w in ranks}
        messages: dict[int, str] = {}
        for rank, exc in errors.items():
            codes[rank] = 1
            messages[rank] = str(exc)
        for rank, reply in replies.items():
            if not reply.ok:
                codes[rank] = 1
                messages[rank] = reply.error or "worker reported an error"
        self.events.finish(event_id, ok=not messages, detail="; ".join(messages.values()) or None)
        return HealthResponse(event_id=event_id, error_codes=dict(sorted(codes.items())), errors=messages)

    def check_finish(self, event_id: str) -> CheckFinishResponse | None:
        """The status of an event id this controller handed out; None when unknown (or forgotten)."""
        record = self.events.get(event_id)
        if record is None:
            return None
        return CheckFinishResponse(
            event_id=event_id, status=record.status, kind=record.kind, detail=record.detail  # type: ignore[arg-type]
        )

