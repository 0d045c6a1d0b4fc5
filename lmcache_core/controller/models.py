"""Request and response bodies of the controller's HTTP API (they feed its OpenAPI schema).

Field names follow LMCache's controller API (``/lookup``, ``/clear``, ``/pin``, ``/unpin``,
``/move``, ``/check_finish``, ``/health``, ``/query_instance``, ``/query_worker_info``,
``/controller/workers``, ``/controller/key-stats``) so existing operator scripts keep working; wire models
from ``lmcache_core.wire`` appear where they cross the API (``HashingParams``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmcache_core.wire import MAX_TOPIC_TOKEN, HashingParams

#: token ids are JSON integers in [0, MAX_TOKEN_ID)
MAX_TOKEN_ID = 2**32
#: longest location or model name a request may carry (an answer may repeat it)
MAX_NAME_LENGTH = 256
#: an instance id longer than this cannot be registered (its topic would not fit)
MAX_INSTANCE_ID_LENGTH = MAX_TOPIC_TOKEN

TokenId = Annotated[int, Field(strict=True, ge=0, lt=MAX_TOKEN_ID)]
InstanceIdField = Annotated[str, Field(min_length=1, max_length=MAX_INSTANCE_ID_LENGTH)]
LocationField = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, description="e.g. 'LocalCPUBackend'.")]

class ApiModel(BaseModel):
    """Base of request bodies: unknown fields are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class LookupRequest(ApiModel):
    """The body of ``/lookup``; ``routes.parse_lookup`` reads it (at C speed) to these rules."""

    tokens: list[TokenId] = Field(description="Token ids of the prompt: JSON integers in [0, 2^32).")
    model: str | None = Field(
        None, max_length=MAX_NAME_LENGTH, description="Only credit instances serving this model."
    )
    instance_id: str | None = Field(
        None, max_length=MAX_INSTANCE_ID_LENGTH, description="Only credit this instance."
    )


class LookupResponse(BaseModel):
    event_id: str
    # a list rather than a tuple: OpenAPI tools read a plain array schema more reliably
    layout_info: dict[str, Annotated[list[str | int], Field(min_length=2, max_length=2)]] = Field(
        description="Per instance holding a prefix: [location holding most of it, matched tokens]."
    )


class ClearRequest(ApiModel):
    instance_id: InstanceIdField
    location: LocationField


class ClearResponse(BaseModel):
    event_id: str
    num_tokens: int = Field(description="Tokens removed, summed over the instance's ranks.")
    num_tokens_per_worker: dict[int, int] | None = Field(
        None, description="Tokens removed per rank; present only when the ranks differ."
    )


class CheckFinishRequest(ApiModel):
    event_id: str = Field(max_length=64)


class CheckFinishResponse(BaseModel):
    event_id: str
    status: Literal["finished", "running", "failed"]
    kind: str = Field(
        description="Which request started the event: lookup, clear, pin, unpin, move, health, "
        "query_instance, query_worker_info, compress, decompress (or the controller's own resync, replay)."
    )
    detail: str | None = None


class HealthRequest(ApiModel):
    instance_id: InstanceIdField


class HealthResponse(BaseModel):
    event_id: str
    error_codes: dict[int, int] = Field(description="Per rank: 0 when it answered a ping.")
    errors: dict[int, str] = Field(default_factory=dict, description="Per failing rank: why.")


class LocationInfo(BaseModel):
    chunks: int
    tokens: int


class LMCacheWorkerFields(BaseModel):
    """A worker as LMCache's API describes it (``/query_worker_info``, ``/controller/workers``)."""

    instance_id: str
    worker_id: int
    ip: str = Field(description="The worker's address (the one it reaches the bus from).")
    port: int = Field(description="LMCache's lmcache_worker_port of the rank when configured, else 0.")
    peer_init_url: str | None = Field(description="LMCache's p2p_host:p2p_init_ports when configured.")
    registration_time: float = Field(description="Unix time of the latest registration.")
    last_heartbeat_time: float = Field(description="Unix time of the latest heartbeat (0: none).")


class WorkerInfo(LMCacheWorkerFields):
    """LMCache's fields of a worker and ours."""

    world_size: int
    epoch: str
    model_name: str
    kv_dtype: str
    hashing: HashingParams
    host: str
    pid: int
    peer_init_url: str | None = Field(None, description="Where this worker serves chunks to peers (enable_p2p).")
    locations: dict[str, LocationInfo] = Field(description="Per location, fastest first.")
    seconds_since_heartbeat: float | None = None


class QueryWorkerInfoRequest(ApiModel):
    instance_id: InstanceIdField = Field(description="An instance id, or 'all': every instance.")
    worker_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Ranks to report; None or []: every rank (with 'all': these ranks of every instance)."
    )


class QueryWorkerInfoResponse(BaseModel):
    event_id: str
    worker_infos: list[WorkerInfo]


class InstanceInfo(BaseModel):
    instance_id: str
    model_name: str
    world_size: int
    locations: list[str]
    chunks: int
    tokens: int
    workers: list[WorkerInfo]


class InstancesResponse(BaseModel):
    instances: list[InstanceInfo]


class TokensAtLocationRequest(ApiModel):
    """The body of ``/pin`` and ``/unpin``: the chunks of ``tokens`` at one location of an instance."""

    instance_id: InstanceIdField
    location: LocationField
    tokens: list[TokenId] = Field(description="Token ids whose chunks to act on: JSON integers in [0, 2^32).")


class ChunksResponse(BaseModel):
    """The answer of ``/pin``, ``/unpin`` and ``/move``."""

    event_id: str
    num_tokens: int = Field(description="Tokens of the chunks acted on, summed over the instance's ranks.")
    num_tokens_per_worker: dict[int, int] | None = Field(
        None, description="Tokens per rank; present only when the ranks differ."
    )


#: ``[instance_id, location]``, as LMCache's ``/move`` names a position
Position = tuple[InstanceIdField, LocationField]


class MoveRequest(ApiModel):
    old_position: Position = Field(description="[instance_id, location] the chunks are at.")
    new_position: Position = Field(description="[instance_id, location] they go to (the same instance).")
    tokens: list[TokenId] | None = Field(
        None, description="Token ids whose chunks to move; null or []: every chunk at old_position."
    )
    should_copy: Annotated[bool, Field(strict=True)] | None = Field(
        False, description="Leave the chunks at old_position too: JSON true or false (null: false)."
    )


class QueryInstanceRequest(ApiModel):
    ip: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="A worker's ip, as it registered it.")
    event_id: str | None = Field(
        None, max_length=64, description="Accepted (and ignored) for LMCache clients that send one."
    )


class QueryInstanceResponse(BaseModel):
    event_id: str
    res: str = Field(description="The instance id of a worker with that ip (the first in id order).")
    instance_ids: list[str] = Field(description="Every instance with a worker at that ip, in id order.")


class WorkerSummary(LMCacheWorkerFields):
    """One worker as ``GET /controller/workers`` lists it (LMCache's fields)."""

    key_count: int = Field(description="Chunks the index credits the worker with, summed over its locations.")


class WorkersResponse(BaseModel):
    workers: list[WorkerSummary]
    total_count: int


class InstanceKeyStats(BaseModel):
    instance_id: str
    key_count: int
    worker_count: int


class KeyStatsResponse(BaseModel):
    total_key_count: int
    total_instance_count: int
    total_worker_count: int
    instances: list[InstanceKeyStats]
class RecodeRequest(ApiModel):
    """The body of ``/compress`` and ``/decompress`` (LMCache's fields)."""

    instance_id: InstanceIdField
    method: str = Field(
        min_length=1, max_length=MAX_NAME_LENGTH, description="Codec name, e.g. 'zstd' or 'int8'."
    )
    location: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="e.g. 'LocalCPUBackend'.")
    tokens: list[TokenId] | None = Field(
        None, description="Only the chunks of these token ids; omitted: every chunk at the location."
    )


class RecodeResponse(BaseModel):
    event_id: str
    num_tokens: int = Field(description="Tokens of the chunks re-encoded, summed over the instance's ranks.")
    num_tokens_per_worker: dict[int, int] | None = Field(
        None, description="Tokens re-encoded per rank; present only when the ranks differ."
    )
