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
    connector_vllm_hold_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "How long the chunks found by a scheduler lookup stay held (safe from eviction and "
            "clears) waiting for their load; a request lost before its load frees them then."
        ),
    )
    connector_vllm_save_queue: int = Field(
        64,
        ge=1,
        description=(
            "Most saves waiting for the background storer; beyond it a save is dropped (a "
            "later miss, counted in the log) rather than stalling vLLM's forward passes."
        ),
    )


@hookimpl
def lmcache_settings_models() -> list[type[BaseModel]]:
    """``connector_vllm_lookup_timeout``, ``connector_vllm_hold_seconds``,
    ``connector_vllm_save_queue``."""
    return [ConnectorSettings]
