"""Typed settings, read from the environment once, failing fast with a clear message.

Shared settings (database, Redis, internal secret) use fixed names such as ``DATABASE_URL`` so
every process reads the same variable; settings of one process carry its own prefix
(``PARKING_GATEWAY_...``, ``PARKING_INGESTION_...``).
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

SPACE_TYPES = ("standard", "ev", "accessible", "motorcycle")


class CommonSettings(BaseSettings):
    """Settings every process needs."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    database_url: str = Field(validation_alias=AliasChoices("DATABASE_URL"))
    redis_url: str = Field(validation_alias=AliasChoices("REDIS_URL"))
    internal_secret: SecretStr = Field(
        validation_alias=AliasChoices("PARKING_INTERNAL_SECRET"),
        min_length=16,
        description="signs the principal the gateway passes to the services",
    )
    log_level: str = Field("INFO", validation_alias=AliasChoices("PARKING_LOG_LEVEL"))
    db_pool_min_size: int = Field(0, ge=0, validation_alias=AliasChoices("PARKING_DB_POOL_MIN"))
    db_pool_max_size: int = Field(8, ge=1, validation_alias=AliasChoices("PARKING_DB_POOL_MAX"))
    db_pool_timeout_s: float = Field(
        2.0, gt=0, validation_alias=AliasChoices("PARKING_DB_POOL_TIMEOUT")
    )
    db_statement_timeout_ms: int = Field(
        5000, ge=0, validation_alias=AliasChoices("PARKING_DB_STATEMENT_TIMEOUT_MS")
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, validation_alias=AliasChoices("PARKING_REDIS_TIMEOUT")
    )
    plate_hash_key: SecretStr = Field(
        SecretStr("change-me-plate-hash-key"),
        validation_alias=AliasChoices("PARKING_PLATE_HASH_KEY"),
        description="keys the hash under which licence plates are stored",
    )
    jwt_secret: SecretStr = Field(
        validation_alias=AliasChoices("PARKING_JWT_SECRET"),
        min_length=32,
        description="signs and verifies driver access tokens (HS256)",
    )
    jwt_issuer: str = Field("parking", validation_alias=AliasChoices("PARKING_JWT_ISSUER"))
    jwt_audience: str = Field("parking-api", validation_alias=AliasChoices("PARKING_JWT_AUDIENCE"))


class ServiceSettings(CommonSettings):
    """Settings of one of the three HTTP services."""

    service_name: str = "service"


class IngestionSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PARKING_INGESTION_", extra="ignore", frozen=True)
    service_name: str = "ingestion"
    max_events_per_batch: int = Field(1000, ge=1, le=10000)
    clock_skew_s: float = Field(300.0, ge=0, description="how far in the future observed_at may be")


class AvailabilitySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARKING_AVAILABILITY_", extra="ignore", frozen=True
    )
    service_name: str = "availability"
    unknown_after_s: float = Field(
        3600.0, gt=0, description="a lot with no data for longer is `unknown`"
    )
    almost_full_ratio: float = Field(0.9, gt=0, le=1)


class ReservationsSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARKING_RESERVATIONS_", extra="ignore", frozen=True
    )
    service_name: str = "reservations"
    access_token_ttl_s: int = Field(900, ge=60, le=900)
    max_window_h: float = Field(24.0, gt=0)
    max_open_per_driver: int = Field(5, ge=1)
    no_show_grace_min: int = Field(15, ge=0)
    idempotency_ttl_h: int = Field(24, ge=24)


class GatewaySettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PARKING_GATEWAY_", extra="ignore", frozen=True)
    admin_key: SecretStr = Field(validation_alias=AliasChoices("PARKING_ADMIN_KEY"), min_length=16)
    ingestion_url: str = "http://127.0.0.1:8081"
    availability_url: str = "http://127.0.0.1:8082"
    reservations_url: str = "http://127.0.0.1:8083"
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    connect_timeout_s: float = Field(1.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    pool_size: int = Field(32, ge=1)
    key_cache_ttl_s: float = Field(30.0, ge=0)
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS (JSON list); none by default"
    )
    rate_limit_enabled: bool = True
    rate_limits: dict[str, tuple[int, float]] = Field(
        default_factory=lambda: {
            "lookups": (100, 1.0),
            "events": (200, 1.0),
            "city": (20, 1.0),
            "account": (10, 60.0),
            "default": (50, 1.0),
        },
        description="per route group: (requests, window seconds), per principal or client address",
    )
    hsts: bool = Field(False, description="send Strict-Transport-Security (behind TLS)")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses of proxies (e.g. the ingress controller) whose X-Forwarded-For"
        " names the client; JSON list of IPs or networks",
    )


class WorkerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PARKING_WORKER_", extra="ignore", frozen=True)
    event_retention_days: int = Field(90, ge=1)
    partitions_ahead_days: int = Field(7, ge=1)
    beat_schedule_file: str = "celerybeat-schedule"
    # broker redelivery of a task whose worker died before acknowledging it
    visibility_timeout_s: int = Field(300, ge=1)
    rollup_every_s: float = Field(20.0, gt=0)
    rollup_lookback_minutes: int = Field(3, ge=1, le=60)
    rollup_max_backfill_minutes: int = Field(1440, ge=1)
    bucket_1m_retention_days: int = Field(7, ge=1)
    bucket_15m_retention_days: int = Field(90, ge=1)
    bucket_1h_retention_days: int = Field(730, ge=1)
    reconcile_every_s: float = Field(60.0, gt=0)
    drift_threshold: int = Field(0, ge=0, description="gate drift above this is reported")
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the worker's (or beat's) /metrics, /healthz and /readyz; 0: none",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address that endpoint binds (0.0.0.0 in a pod, for the kubelet)"
    )
    webhook_scan_every_s: float = Field(5.0, gt=0)
    district_snapshot_every_s: float = Field(300.0, gt=0)
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_backoff_max_s: float = Field(3600.0, gt=0)
    webhook_log_retention_days: int = Field(30, ge=1)
    webhook_allow_private_networks: bool = Field(
        False, description="deliver to loopback/private addresses (local stacks and tests only)"
    )


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], **overrides: Any) -> S:
    """Read ``cls`` from the environment, or exit with one clear line per missing/bad setting."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            field = cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
            alias = getattr(field, "validation_alias", None) if field else None
            env = (
                alias.choices[0]
                if isinstance(alias, AliasChoices)
                else f"{cls.model_config.get('env_prefix', '')}{name}".upper()
            )
            lines.append(f"  {env}: {err['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


@cache
def cached(cls: type[S]) -> S:
    """One settings object per class and process."""
    return load(cls)
