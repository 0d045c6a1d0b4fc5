"""Configuration keys of LocalDiskBackend (they join the root settings through its BackendSpec)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class DiskSettings(BaseModel):
    """The ``disk_*`` keys. The directory and capacity are LMCache's ``local_disk`` and
    ``max_local_disk_size``."""

    disk_write_queue_size: int = Field(
        64,
        ge=1,
        description="Most chunks waiting for the background disk writer; a put beyond it "
        "follows disk_queue_full_policy.",
    )
    disk_queue_full_policy: Literal["block", "drop"] = Field(
        "block",
        description="When the disk write queue is full: 'block' makes put wait for room "
        "(backpressure on the caller); 'drop' skips the chunk and counts it in stats()['dropped'].",
    )
    disk_fsync: bool = Field(
        True,
        description="fsync every chunk file and the directory before a chunk is announced, so an "
        "admitted chunk survives a power loss; off trades that for write speed.",
    )
    disk_auto_capacity_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Used only when max_local_disk_size is 0 (LMCache's default), which never "
        "means 'unbounded' here: the capacity becomes this fraction of the free space on "
        "local_disk's filesystem at startup plus the bytes its chunk files already use.",
    )

    @classmethod
    def from_settings(cls, settings: Any) -> "DiskSettings":
        """The ``disk_*`` values of a root settings object (defaults for keys it lacks)."""
        present = {name: getattr(settings, name) for name in cls.model_fields if hasattr(settings, name)}
        return cls.model_validate(present)
