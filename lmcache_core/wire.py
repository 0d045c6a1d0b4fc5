"""The worker <-> controller protocol: topics and typed, versioned messages.

Every message is a pydantic model serialized as JSON (binary arrays as base64). Topics are
relative to the transport's prefix (``lmcache`` by default). ``PROTOCOL_VERSION`` is carried by
every message; a receiver rejects a major version it does not know, naming both.

Topics (``<inst>`` and ``<w>`` are ``topic_token(instance_id)`` and the worker rank; an instance
id must encode to at most ``MAX_TOPIC_TOKEN`` bytes, see ``check_instance_id``):

=================================  =========  =================================================
``register.<inst>.<w>``            request    worker -> controller: ``WorkerRegistration`` ->
                                              ``RegistrationAck``
``events.<inst>.<w>``              publish    worker -> controller: ``EventBatch``
``heartbeat.<inst>.<w>``           publish    worker -> controller: ``Heartbeat``
``cmd.<inst>.<w>``                 request    controller (or ``lmcache nats``) -> worker:
                                              ``CommandRequest`` -> ``CommandReply``
``cmd.<inst>.*`` / ``cmd.*.*``     request    fan-out helpers may also address every rank
``controller.hello``               publish    controller -> workers when it starts: re-register
                                              and resync (a restarted controller recovers)
``controller.hello.<inst>.<w>``    publish    controller -> one worker it does not know (a
                                              ``Hello`` naming that worker's epoch): register
                                              again; no other worker is disturbed
``goodbye.<inst>.<w>``             publish    worker -> controller when it stops cleanly
                                              (``WorkerIdentity``): leave the index at once
``peer_lookup.<inst>.<w>``         request    worker -> controller on a local miss (P2P):
                                              ``PeerLookupRequest`` -> ``PeerLookupReply``, the
                                              peer of the same rank holding the longest prefix
=================================  =========  =================================================

Ordering and loss: ``EventBatch.seq`` counts a worker's batches per location from 1, within one
``epoch`` (a fresh id per worker start). A receiver holds batches that arrive ahead of a missing
one and applies them in order once it arrives; a gap (a missing seq, or a heartbeat whose
``last_seq`` is beyond what it applied) that outlives a grace period is repaired with a
``replay`` of the missing range, which the worker re-publishes from the batches it retains
(byte for byte, same seq). A range the worker no longer retains falls back to a ``resync``: the
worker sends that location's whole inventory as batches whose first has ``reset=True``,
continuing the same seq numbering, so the receiver converges to what the worker holds. Applying
an admit twice or evicting an absent chunk is harmless by design, so replays converge.

Deadlines: a ``CommandRequest`` carries ``deadline`` (Unix time: the sender's clock, so hosts
keep their clocks in sync, e.g. NTP); a worker that reads a command after it answers
``error_kind='expired'`` and does not carry it out, so a clear its sender gave up on (504) never
happens later.

Identity: every topic a worker publishes on names its instance and rank, and the receiver
checks that the ids inside the message are the ones its topic names, so a bus that lets each
instance publish only its own topics (``worker_topics``: NATS authorization permissions) also
stops it from speaking for another.

Versions: 5 adds ``peer_lookup`` requests, ``WorkerRegistration.peer_init_url`` and the
``push`` command (peer-to-peer transfer, ``lmcache_core.p2p``); 4 adds the ``replay`` command, ``CommandRequest.deadline`` and the reply kinds
``not_retained`` and ``expired``; 3 puts the instance and rank into the registration topic (``register.<inst>.<w>``,
was ``register``), so bus permissions tell one instance's registrations from another's; 2
escapes instance ids in topics byte by byte (``a.b`` -> ``a%2Eb``), so distinct ids never share
a topic; 1 hex-encoded a whole id that was not plain, so ``a.b`` and a literal
``x612e62`` shared one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 5

#: characters a topic token keeps as they are; every other byte is escaped as ``%XX``
_PLAIN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
#: longest topic token an instance id may encode to: the topics around it (prefix, kind, rank,
#: a reply inbox) stay far below the NATS control-line limit (4 KiB)
MAX_TOPIC_TOKEN = 200


def topic_token(text: str) -> str:
    """A single, wildcard-free topic token for ``text``; distinct texts get distinct tokens.

    Plain ids (letters, digits, ``_``, ``-``) stay as they are; any other byte of the UTF-8
    encoding, ``%`` included, becomes ``%XX`` (upper-case hex): ``a.b`` -> ``a%2Eb``, while
    ``x612e62`` and ``a%2Eb`` (-> ``a%252Eb``) keep their own. The empty id is ``%``, which no
    other id encodes to.
    """
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    if not text:
        return "%"
    return "".join(chr(b) if chr(b) in _PLAIN_CHARS else f"%{b:02X}" for b in text.encode("utf-8"))


def check_instance_id(instance_id: str) -> str:
    """``instance_id`` unchanged when its topic token fits in ``MAX_TOPIC_TOKEN`` bytes; a
    ``ValueError`` saying why otherwise (the settings and wire models validate with it)."""
    # an id never encodes to fewer bytes than it has characters: long ones need no encoding
    if len(instance_id) <= MAX_TOPIC_TOKEN and len(topic_token(instance_id)) <= MAX_TOPIC_TOKEN:
        return instance_id
    raise ValueError(
        f"an instance id of {len(instance_id)} characters is too long for a message-bus subject: "
        f"it must encode to at most {MAX_TOPIC_TOKEN} bytes (letters, digits, '_' and '-' take 1 "
        "byte each, any other byte 3)"
    )


#: an instance id that fits in a topic (validated with ``check_instance_id``)
InstanceId = Annotated[str, AfterValidator(check_instance_id)]


def events_topic(instance_id: str, worker_id: int) -> str:
    return f"events.{topic_token(instance_id)}.{worker_id}"


def heartbeat_topic(instance_id: str, worker_id: int) -> str:
    return f"heartbeat.{topic_token(instance_id)}.{worker_id}"


def command_topic(instance_id: str, worker_id: int) -> str:
    return f"cmd.{topic_token(instance_id)}.{worker_id}"


def register_topic(instance_id: str, worker_id: int) -> str:
    return f"register.{topic_token(instance_id)}.{worker_id}"


def hello_topic(instance_id: str, worker_id: int) -> str:
    return f"{HELLO_TOPIC}.{topic_token(instance_id)}.{worker_id}"


def goodbye_topic(instance_id: str, worker_id: int) -> str:
    return f"goodbye.{topic_token(instance_id)}.{worker_id}"


def peer_lookup_topic(instance_id: str, worker_id: int) -> str:
    return f"peer_lookup.{topic_token(instance_id)}.{worker_id}"


#: where protocol 2 and older workers registered: the controller answers them with a refusal
LEGACY_REGISTER_TOPIC = "register"
HELLO_TOPIC = "controller.hello"
REGISTER_WILDCARD = "register.*.*"
EVENTS_WILDCARD = "events.*.*"
HEARTBEAT_WILDCARD = "heartbeat.*.*"
GOODBYE_WILDCARD = "goodbye.*.*"
PEER_LOOKUP_WILDCARD = "peer_lookup.*.*"


@dataclass(frozen=True)
class WorkerTopics:
    """The topic patterns the workers of one instance use (any rank): what a bus with
    permissions lets that instance's credentials publish and subscribe to, and nothing more."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def worker_topics(instance_id: str) -> WorkerTopics:
    """Topics of every rank of ``instance_id``: it publishes its events, heartbeats,
    registrations, goodbyes and peer lookups, and listens to its commands and to the controller's hellos."""
    token = topic_token(instance_id)
    return WorkerTopics(
        publish=tuple(f"{kind}.{token}.*" for kind in ("events", "heartbeat", "register", "goodbye", "peer_lookup")),
        subscribe=(f"cmd.{token}.*", HELLO_TOPIC, f"{HELLO_TOPIC}.{token}.*"),
    )


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
    instance_id: InstanceId
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
    peer_init_url: str | None = Field(
        None, description="host:port where this worker serves its chunks to peers (enable_p2p); None: it does not."
    )


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

    instance_id: InstanceId
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


class Hello(WireModel):
    """The controller asks workers to register again and resync."""

    epoch: str | None = Field(
        None,
        description="On one worker's own hello topic: the run it is meant for (a worker of "
        "another epoch on that topic, a duplicate, ignores it); None: every worker.",
    )


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


class ReplayCommand(WireModel):
    """Publish again the retained batches ``first_seq`` .. ``last_seq`` of one location (those
    beyond the last one published are skipped); 'not_retained' when the first is gone."""

    op: Literal["replay"] = "replay"
    location: str
    first_seq: int = Field(ge=1)
    last_seq: int = Field(ge=1)


class PingCommand(WireModel):
    op: Literal["ping"] = "ping"


class PushCommand(WireModel):
    """Push the stored prefix of ``tokens`` (the chunks at ``location``; None: any tier) to the
    peer at ``peer_init_url``, which stores them at ``target_location`` (None: every tier); then,
    unless ``should_copy``, drop them from ``location``. The reply's ``num_tokens``: tokens the peer
    confirmed."""

    op: Literal["push"] = "push"
    tokens: list[int]
    peer_init_url: str
    location: str | None = None
    target_location: str | None = None
    should_copy: bool = True


Command = Annotated[
    Union[ClearCommand, LookupCommand, ResyncCommand, ReplayCommand, PingCommand, PushCommand],
    Field(discriminator="op"),
]


class CommandRequest(WireModel):
    event_id: str = Field(description="Id the controller tracks (check_finish).")
    command: Command
    deadline: float | None = Field(
        None,
        description="Unix time (the sender's clock) after which the worker must not carry the "
        "command out: it answers error_kind 'expired' instead. None: no deadline.",
    )


class CommandReply(WireModel):
    """A worker's answer. ``error_kind`` is machine-readable: 'unknown_location', 'bad_request',
    'not_retained' (a replay of batches no longer kept), 'expired' (read after its deadline, not
    carried out), 'internal'; ``error`` is the human message."""

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
        description="clear/resync/replay: per location, the seq of the last batch published before "
        "replying (the batch holding the clear event for clear); the receiver ignores older batches.",
    )
    registration: WorkerRegistration | None = None


# --- peer lookups (request/reply on peer_lookup.<inst>.<w>) -----------------------------------


class PeerLookupRequest(WorkerIdentity):
    """A worker missing a prefix asks which peer (another instance, same rank, model shard and
    hashing) holds the longest prefix of these chunk hashes (little-endian uint64, in order)."""

    hashes: bytes
    num_tokens: int = Field(ge=0, description="Tokens the hashes cover (the last chunk may be short).")

    def hash_array(self) -> np.ndarray:
        return np.frombuffer(self.hashes, dtype="<u8")


class PeerLookupReply(WireModel):
    """The best peer, or ``found=False``; ``num_tokens``/``chunks``: the prefix it holds."""

    found: bool
    instance_id: str | None = None
    worker_id: int | None = None
    peer_init_url: str | None = None
    chunks: int = 0
    num_tokens: int = 0
    detail: str = ""
