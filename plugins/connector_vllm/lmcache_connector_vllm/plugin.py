"""The ``connector_vllm`` entry point in the ``lmcache`` group: the connector's settings keys."""

from __future__ import annotations

from pydantic import BaseModel, Field

from lmcache_core.hookspecs import hookimpl


class ConnectorSettings(BaseModel):
    """Keys read by the vLLM connector."""

    connector_vllm_lookup_timeout: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds vLLM's scheduler waits to reach a worker's lookup socket before it counts "
            "a request as a cache miss."
        ),
    )


@hookimpl
def lmcache_settings_models() -> list[type[BaseModel]]:
    """``connector_vllm_lookup_timeout``."""
    return [ConnectorSettings]
