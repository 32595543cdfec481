"""Configuration, read once from ``METERING_*`` environment variables.

Library code never reads ``os.environ``: the CLI and ``streams/app.py`` call
:meth:`Settings.from_env` and pass the values (or the object) down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from metering.errors import ConfigurationError

PREFIX = "METERING_"


@dataclass(frozen=True, slots=True)
class Settings:
    # services
    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = "postgresql://metering:metering@127.0.0.1:5432/metering"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # topics
    events_topic: str = "usage.events"
    dlq_topic: str = "usage.events.dlq"
    alerts_topic: str = "keys.alerts"
    events_partitions: int = 6
    replication_factor: int = 1

    # worker
    worker_id: str = "metering-usage"  # Kafka consumer group of the stream app
    batch_size: int = 5000
    batch_within_s: float = 0.5
    writers: int = 2  # batches in flight per worker (agent actors, one DB connection each)
    session_timeout_s: float = 60.0  # a crashed worker's partitions move after this
    reconcile_interval_s: float = 30.0  # partitions ahead + Redis rebuild check
    db_command_timeout_s: float = 30.0  # a statement silent this long is an outage: retried
    web_enabled: bool = True
    web_port: int = 6066
    web_bind: str = "127.0.0.1"
    redis_key_prefix: str = "metering"

    # edge: keys, limits, quotas
    # HMAC pepper for key hashes; changing it invalidates every key. Kept out of repr().
    key_pepper: str = field(default="", repr=False)
    key_cache_ttl_s: int = 60  # verified identities cached in Redis
    negative_cache_ttl_s: int = 30  # unknown keys cached in Redis
    rotation_grace_hours: float = 24.0
    anonymous_per_day: int = 50  # per client IP, requests without a key
    auth_failures_per_minute: int = 5  # per client IP, then 429
    redis_failure_mode: str = "open"  # open: allow + log + count; closed: 503
    last_used_flush_s: float = 30.0
    trusted_proxies: str = ""  # comma-separated CIDRs whose X-Forwarded-For is believed
    producer_linger_ms: int = 100  # edge events gather this long: one produce request each
    producer_buffer: int = 100_000  # events held while Kafka is away, then dropped (counted)

    # event policy
    max_future_skew_s: int = 300
    retention_days: int = 90
    partitions_ahead_months: int = 2

    @property
    def pepper(self) -> bytes | None:
        """The key-hash pepper as bytes, or None when none is configured."""
        return self.key_pepper.encode() or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``METERING_<FIELD>`` variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name not in env:
                continue
            raw = env[name]
            values[f.name] = _coerce(name, raw, type(f.default))
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigurationError("METERING_BATCH_SIZE must be >= 1")
        if not 1 <= self.writers <= 16:
            raise ConfigurationError("METERING_WRITERS must be between 1 and 16")
        if self.batch_within_s <= 0:
            raise ConfigurationError("METERING_BATCH_WITHIN_S must be > 0")
        if self.reconcile_interval_s <= 0 or self.session_timeout_s <= 0:
            raise ConfigurationError(
                "METERING_RECONCILE_INTERVAL_S and METERING_SESSION_TIMEOUT_S must be > 0"
            )
        if not 1 <= self.db_command_timeout_s <= 3600:
            raise ConfigurationError("METERING_DB_COMMAND_TIMEOUT_S must be between 1 and 3600")
        if self.events_partitions < 1:
            raise ConfigurationError("METERING_EVENTS_PARTITIONS must be >= 1")
        if self.retention_days < 1:
            raise ConfigurationError("METERING_RETENTION_DAYS must be >= 1")
        if not 0 <= self.producer_linger_ms <= 5_000:
            raise ConfigurationError("METERING_PRODUCER_LINGER_MS must be between 0 and 5000")
        if self.producer_buffer < 1:
            raise ConfigurationError("METERING_PRODUCER_BUFFER must be >= 1")
        if self.redis_failure_mode not in ("open", "closed"):
            raise ConfigurationError("METERING_REDIS_FAILURE_MODE must be 'open' or 'closed'")
        if not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigurationError("METERING_DATABASE_URL must be a postgresql:// URL")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("METERING_REDIS_URL must be a redis:// URL")


def _coerce(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    return raw
