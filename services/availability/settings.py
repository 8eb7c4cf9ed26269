"""Tuning of the availability read path, read from ``PARKING_AVAILABILITY_*`` once per process.

Kept beside the service (not in services.common.config) because only this service reads them;
``AvailabilitySettings`` (unknown_after_s, almost_full_ratio) stays the service's main settings.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ReadPathSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARKING_AVAILABILITY_", extra="ignore", frozen=True
    )
    # Writers drop a lot's cached count when they change it (and retry while Redis is down);
    # counts also change at reservation window boundaries, which cap each entry's life. This
    # bound only covers a drop lost with its process, so it can be long: filling the counts of
    # many lots at once again and again would cost PostgreSQL a query per lot read.
    reserved_cache_max_s: float = Field(
        600.0, gt=0, le=3600, description="longest a reserved count is cached in Redis"
    )
    redis_retry_after_s: float = Field(
        1.0, ge=0, description="after a Redis failure, serve from PostgreSQL this long"
    )
    # Each cached lot costs about 3 KB of this process's memory.
    lot_cache_max: int = Field(
        200_000, ge=0, le=1_000_000, description="lots (and their views) kept parsed per process"
    )
    # The worker's copy of the geo index costs about 650 bytes a lot (65 MB at 100,000).
    geo_copy_max: int = Field(
        500_000, ge=0, description="largest geo index a worker copies (0: never; GEOSEARCH then)"
    )
    refill_chunk: int = Field(5000, ge=100, le=100_000, description="lots per refill batch")
    stream_heartbeat_s: float = Field(15.0, gt=0, le=300, description="SSE comment interval")
    stream_retry_ms: int = Field(2000, ge=100, description="SSE reconnect delay for clients")
    stream_queue: int = Field(64, ge=1, le=10_000, description="frames buffered per client")
