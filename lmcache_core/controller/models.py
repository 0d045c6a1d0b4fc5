"""Request and response bodies of the controller's HTTP API (they feed its OpenAPI schema).

Field names follow LMCache's controller API (``/lookup``, ``/clear``, ``/check_finish``,
``/health``, ``/query_worker_info``) so existing operator scripts keep working; wire models
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
    location: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="e.g. 'LocalCPUBackend'.")


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
    kind: str = Field(description="Which request started the event: lookup, clear or health.")
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


class WorkerInfo(BaseModel):
    instance_id: str
    worker_id: int
    world_size: int
    epoch: str
    model_name: str
    kv_dtype: str
    hashing: HashingParams
    host: str
    pid: int
    peer_init_url: str | None = Field(None, description="Where this worker serves chunks to peers (enable_p2p).")
    locations: dict[str, LocationInfo] = Field(description="Per location, fastest first.")
    registration_time: float = Field(description="Unix time of the latest registration.")
    last_heartbeat_time: float = Field(description="Unix time of the latest heartbeat (0: none).")
    seconds_since_heartbeat: float | None = None


class QueryWorkerInfoRequest(ApiModel):
    instance_id: InstanceIdField
    worker_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Ranks to report; None: every rank."
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
