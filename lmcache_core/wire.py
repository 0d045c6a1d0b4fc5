"""The worker <-> controller protocol: topics and typed, versioned messages.

Every message is a pydantic model serialized as JSON (binary arrays as base64). Topics are
relative to the transport's prefix (``lmcache`` by default). ``PROTOCOL_VERSION`` is carried by
every message; a receiver rejects a major version it does not know, naming both.

Topics (``<inst>`` and ``<w>`` are ``topic_token(instance_id)`` and the worker rank):

=================================  =========  =================================================
``register``                       request    worker -> controller: ``WorkerRegistration`` ->
                                              ``RegistrationAck``
``events.<inst>.<w>``              publish    worker -> controller: ``EventBatch``
``heartbeat.<inst>.<w>``           publish    worker -> controller: ``Heartbeat``
``cmd.<inst>.<w>``                 request    controller (or ``lmcache nats``) -> worker:
                                              ``CommandRequest`` -> ``CommandReply``
``cmd.<inst>.*`` / ``cmd.*.*``     request    fan-out helpers may also address every rank
``controller.hello``               publish    controller -> workers when it starts: re-register
                                              and resync (a restarted controller recovers)
=================================  =========  =================================================

Ordering and loss: ``EventBatch.seq`` counts a worker's batches per location from 1, within one
``epoch`` (a fresh id per worker start). A receiver that sees a gap (or a heartbeat whose
``last_seq`` is beyond what it applied) asks for a ``resync``; the worker then sends that
location's whole inventory as batches whose first has ``reset=True``, continuing the same seq
numbering, so the receiver converges to what the worker holds. Applying an admit twice or
evicting an absent chunk is harmless by design, so replays converge.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")


def topic_token(text: str) -> str:
    """A single, wildcard-free topic token for ``text`` (ids with dots or spaces are hex-encoded)."""
    if _SAFE_TOKEN.match(text):
        return text
    return "x" + text.encode("utf-8").hex()


def events_topic(instance_id: str, worker_id: int) -> str:
    return f"events.{topic_token(instance_id)}.{worker_id}"


def heartbeat_topic(instance_id: str, worker_id: int) -> str:
    return f"heartbeat.{topic_token(instance_id)}.{worker_id}"


def command_topic(instance_id: str, worker_id: int) -> str:
    return f"cmd.{topic_token(instance_id)}.{worker_id}"


REGISTER_TOPIC = "register"
HELLO_TOPIC = "controller.hello"
EVENTS_WILDCARD = "events.*.*"
HEARTBEAT_WILDCARD = "heartbeat.*.*"


class WireModel(BaseModel):
    """Base of every wire message: strict about unknown fields, bytes as base64 in JSON."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    version: int = Field(PROTOCOL_VERSION, description="Protocol version of the sender.")

    def encode(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes):  # -> Self
        return cls.model_validate_json(payload)


class HashingParams(WireModel):
    """How a worker hashes tokens (the controller hashes lookups the same way)."""

    scheme: str = Field(description="Hash scheme id, e.g. 'xxh3-64-chain/v1' (lmcache_core.keys).")
    chunk_size: int = Field(gt=0)
    namespace: str = Field("", description="Tenant salt mixed into the chain's seed.")


class WorkerIdentity(WireModel):
    instance_id: str
    worker_id: int = Field(ge=0, description="Tensor-parallel rank of this worker.")
    epoch: str = Field(description="Fresh random id per worker start; resets sequence numbers.")


class WorkerRegistration(WorkerIdentity):
    """Sent on start, after a reconnect, and when a controller says hello."""

    world_size: int = Field(1, ge=1)
    model_name: str
    kv_dtype: str
    hashing: HashingParams
    locations: list[str] = Field(description="Location names this worker serves, fastest first.")
    host: str = Field("", description="Host name, for operators.")
    pid: int = 0


class RegistrationAck(WireModel):
    accepted: bool
    detail: str = ""
    resync: bool = Field(True, description="Whether the worker should send its inventory now.")


class EventBatch(WireModel):
    """Ordered KV events of one worker at one location.

    ``kinds`` (uint8), ``hashes`` (little-endian uint64) and ``tokens`` (little-endian uint32)
    are parallel arrays, one entry per event: kind 1 admit, 2 evict, 3 clear (hash 0, tokens the
    total removed). Use ``EventBatch.build`` / ``arrays()`` rather than packing by hand.
    """

    instance_id: str
    worker_id: int
    epoch: str
    location: str
    seq: int = Field(ge=1)
    reset: bool = Field(False, description="Resync: forget this location's entries, then apply.")
    kinds: bytes
    hashes: bytes
    tokens: bytes

    @classmethod
    def build(
        cls,
        ident: WorkerIdentity,
        location: str,
        seq: int,
        kinds: np.ndarray,
        hashes: np.ndarray,
        tokens: np.ndarray,
        reset: bool = False,
    ) -> "EventBatch":
        return cls(
            instance_id=ident.instance_id,
            worker_id=ident.worker_id,
            epoch=ident.epoch,
            location=location,
            seq=seq,
            reset=reset,
            kinds=np.ascontiguousarray(kinds, dtype=np.uint8).tobytes(),
            hashes=np.ascontiguousarray(hashes, dtype="<u8").tobytes(),
            tokens=np.ascontiguousarray(tokens, dtype="<u4").tobytes(),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kinds = np.frombuffer(self.kinds, dtype=np.uint8)
        hashes = np.frombuffer(self.hashes, dtype="<u8")
        tokens = np.frombuffer(self.tokens, dtype="<u4")
        if not (len(kinds) == len(hashes) == len(tokens)):
            raise ValueError(
                f"event batch arrays differ in length: kinds {len(kinds)}, "
                f"hashes {len(hashes)}, tokens {len(tokens)}"
            )
        return kinds, hashes, tokens


class Heartbeat(WorkerIdentity):
    last_seq: dict[str, int] = Field(
        default_factory=dict, description="Latest EventBatch.seq published, per location."
    )
    chunks: dict[str, int] = Field(default_factory=dict, description="Chunks held, per location.")


# --- commands (request/reply on cmd.<inst>.<w>) ------------------------------------------------


class ClearCommand(WireModel):
    op: Literal["clear"] = "clear"
    location: str


class LookupCommand(WireModel):
    op: Literal["lookup"] = "lookup"
    tokens: list[int]


class ResyncCommand(WireModel):
    op: Literal["resync"] = "resync"
    locations: list[str] | None = Field(None, description="None: every location.")


class PingCommand(WireModel):
    op: Literal["ping"] = "ping"


Command = Annotated[
    Union[ClearCommand, LookupCommand, ResyncCommand, PingCommand], Field(discriminator="op")
]


class CommandRequest(WireModel):
    event_id: str = Field(description="Id the controller tracks (check_finish).")
    command: Command


class CommandReply(WireModel):
    """A worker's answer. ``error_kind`` is machine-readable: 'unknown_location', 'bad_request',
    'internal'; ``error`` is the human message."""

    ok: bool
    instance_id: str
    worker_id: int
    epoch: str = ""
    error: str | None = None
    error_kind: str | None = None
    available_locations: list[str] | None = None
    num_tokens: int | None = Field(None, description="clear: tokens removed; lookup: prefix tokens.")
    location: str | None = Field(None, description="lookup: the location holding most of the prefix.")
    last_seq: dict[str, int] | None = Field(
        None,
        description="clear/resync: per location, the seq of the last batch published before "
        "replying (the batch holding the clear event for clear); the receiver ignores older batches.",
    )
    registration: WorkerRegistration | None = None
