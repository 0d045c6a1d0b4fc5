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

Recovery: a version-5 controller answers a registration with ``resync=False`` and pulls the
inventories it needs itself, a bounded window of workers at a time, with ``inventory`` commands:
each reply carries one page of a snapshot taken as of the last batch published (``seq``), so
only the controller that asked receives it, and what it has in flight is bounded by the window
times one page. Batches after ``seq`` wait (held) until the snapshot is installed.

Versions: 5 adds the ``inventory`` command and its ``InventoryPage`` reply (paced, targeted
recovery; the registration ack no longer asks for a pushed resync), the registration's
``started_at`` and ``lost_events``, the ``pin``, ``unpin`` and ``move`` commands
(``ChunksCommand``: the chunks of some tokens, or all, at one location), the ``recode`` command
(``/compress`` and ``/decompress``: re-encode one location's chunks in place) with the reply
kinds ``unknown_codec`` (with ``available_codecs``) and ``unsupported``, the registration's
``ip``, ``port`` and ``peer_init_url`` (LMCache's worker fields; the URL where the worker's peer
channel serves, ``lmcache_core.p2p``), ``peer_lookup`` requests and the ``push`` command
(peer-to-peer transfer); 4 adds the ``replay`` command, ``CommandRequest.deadline`` and the reply kinds
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
    ip: str = Field("", description="The worker's IP address (the one it reaches the bus from); what /query_instance matches.")
    port: int = Field(0, ge=0, le=65535, description="LMCache's lmcache_worker_port(s) of this rank when configured, else 0.")
    peer_init_url: str | None = Field(
        None, description="host:port where this worker serves its chunks to peers (enable_p2p); None: it does not."
    )
    started_at: float = Field(
        0.0, description="Unix time this run started: of two live runs on one rank (a duplicate "
        "instance id), every controller keeps the one started first (ties: the lower epoch)."
    )
    lost_events: bool = Field(
        False, description="Events were dropped unsent since this run's last accepted registration "
        "(no bus): the controller pulls its whole inventory even when it knows this run."
    )


class RegistrationAck(WireModel):
    accepted: bool
    detail: str = ""
    resync: bool = Field(
        True, description="Whether the worker should publish its inventory now (reset batches). A "
        "version-5 controller answers False and pulls what it needs with 'inventory' commands."
    )


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
    used_bytes: dict[str, int] = Field(default_factory=dict, description="Bytes used, per location.")
    capacity_bytes: dict[str, int] = Field(
        default_factory=dict, description="Bytes a location may use, where it has a bound."
    )


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


class ChunksCommand(WireModel):
    """Act on the chunks of ``tokens`` (None: every chunk there) at one ``location``: ``pin``
    or ``unpin`` them, or ``move`` them to ``to_location`` (``should_copy``: keep them at ``location``
    too). The reply's ``num_tokens`` counts the tokens of the chunks acted on; a move's
    ``last_seq`` names the last batch published at both locations."""

    op: Literal["pin", "unpin", "move"]
    location: str
    tokens: list[int] | None = Field(None, description="Token ids whose chunks to act on; None: every chunk.")
    to_location: str | None = Field(None, description="move: where the chunks go.")
    should_copy: bool = Field(False, description="move: leave the chunks at location too.")


class RecodeCommand(WireModel):
    """Re-encode the chunks at one location in place: ``compress`` with codec ``method``, or
    ``decompress`` what ``method`` encoded; only the chunks of ``tokens`` when given. The reply's
    ``num_tokens`` counts the tokens of the chunks changed."""

    op: Literal["recode"] = "recode"
    action: Literal["compress", "decompress"]
    method: str
    location: str
    tokens: list[int] | None = None


#: most entries one inventory page may carry (13 bytes each, base64: well under NATS' 1 MiB payload)
MAX_INVENTORY_PAGE = 32_768


class InventoryCommand(WireModel):
    """Answer one page of a location's inventory. Without ``snapshot`` the worker first takes
    one, as of the last batch it published at that location (pending events go out first);
    later pages name the snapshot the first reply named ('no_snapshot' when it is gone)."""

    op: Literal["inventory"] = "inventory"
    location: str
    snapshot: str | None = None
    offset: int = Field(0, ge=0, description="First entry of the page within the snapshot.")
    limit: int = Field(MAX_INVENTORY_PAGE, ge=1, le=MAX_INVENTORY_PAGE, description="Most entries in the page.")


class InventoryPage(WireModel):
    """One page of an inventory snapshot: chunk hashes (little-endian uint64) and token counts
    (little-endian uint32), entries ``offset`` .. ``offset + len - 1`` of ``total``."""

    snapshot: str = Field(description="Id the following pages' requests name.")
    location: str
    seq: int = Field(ge=0, description="The snapshot holds every batch up to this seq, none after it.")
    total: int = Field(ge=0, description="Entries in the whole snapshot.")
    offset: int = Field(ge=0)
    hashes: bytes
    tokens: bytes

    @classmethod
    def build(
        cls, snapshot: str, location: str, seq: int, total: int, offset: int, hashes: np.ndarray, tokens: np.ndarray
    ) -> "InventoryPage":
        return cls(
            snapshot=snapshot, location=location, seq=seq, total=total, offset=offset,
            hashes=np.ascontiguousarray(hashes, dtype="<u8").tobytes(),
            tokens=np.ascontiguousarray(tokens, dtype="<u4").tobytes(),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        hashes = np.frombuffer(self.hashes, dtype="<u8")
        tokens = np.frombuffer(self.tokens, dtype="<u4")
        if len(hashes) != len(tokens):
            raise ValueError(f"inventory page arrays differ in length: hashes {len(hashes)}, tokens {len(tokens)}")
        if self.offset + len(hashes) > self.total:
            raise ValueError(f"inventory page {self.offset}+{len(hashes)} runs past its total {self.total}")
        return hashes, tokens


Command = Annotated[
    Union[ClearCommand, LookupCommand, ResyncCommand, ReplayCommand, PingCommand, InventoryCommand, ChunksCommand, RecodeCommand, PushCommand],
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
    'not_retained' (a replay of batches no longer kept), 'no_snapshot' (an inventory page
    of a snapshot no longer kept), 'expired' (read after its deadline, not carried out),
    'unknown_codec' (with ``available_codecs``), 'unsupported' (a codec cannot do what was asked
    there), 'internal'; ``error`` is the human message."""

    ok: bool
    instance_id: str
    worker_id: int
    epoch: str = ""
    error: str | None = None
    error_kind: str | None = None
    available_locations: list[str] | None = None
    available_codecs: list[str] | None = None
    num_tokens: int | None = Field(
        None,
        description="clear: tokens removed; lookup: prefix tokens; pin, unpin, move: tokens of the "
        "chunks acted on; recode: tokens re-encoded.",
    )
    location: str | None = Field(None, description="lookup: the location holding most of the prefix.")
    last_seq: dict[str, int] | None = Field(
        None,
        description="clear/resync/replay: per location, the seq of the last batch published before "
        "replying (the batch holding the clear event for clear); the receiver ignores older batches.",
    )
    registration: WorkerRegistration | None = None
    inventory: InventoryPage | None = Field(None, description="inventory: the page asked for.")


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
