"""Configuration, read once from ``METERING_*`` environment variables.

Library code never reads ``os.environ``: the CLI and ``streams/app.py`` call
:meth:`Settings.from_env` and pass the values (or the object) down.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
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
    # static membership (KIP-345): a worker restarted with the same id takes its
    # partitions back at once instead of after session_timeout_s; unique per worker
    worker_instance_id: str = ""
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
    auth_failures_per_minute: int = 5  # per client IP (IPv6: per prefix), then 429
    ipv6_bucket_prefix: int = 64  # IPv6 clients share throttles per this prefix
    redis_failure_mode: str = "open"  # open: in-process limits; closed: 503
    edge_instances: int = (
        1  # edge processes sharing the limits (each keeps 1/n while Redis is away)
    )
    last_used_flush_s: float = 30.0
    trusted_proxies: str = ""  # comma-separated CIDRs whose X-Forwarded-For is believed
    producer_linger_ms: int = 100  # edge events gather this long: one produce request each
    producer_buffer: int = (
        100_000  # billable events held while Kafka is away, then dropped (counted)
    )
    producer_unbilled_buffer: int = (
        10_000  # refused and anonymous requests' events: their own budget
    )
    refused_records_per_minute: int = 10  # refused requests recorded one by one per client
    # (key, or address) and minute; the rest as one summary record per client, minute, reason

    # anomaly detection (metering/detect/rules.py has every threshold and its default)
    detection_enabled: bool = True
    detection_rules: str = ""  # JSON object overriding thresholds, e.g. {"spike_factor": 6}
    # compacted changelog of the rules' state; "" = "<worker_id>-detection-state" (one
    # per consumer group: two deployments reading one events topic never share it)
    detection_state_topic: str = ""
    detection_checkpoint_s: float = 10.0  # state saved this often (a crash replays at most this)
    detection_revoke: bool = False  # critical findings revoke the key (else quarantine + rotation)
    forced_rotation_hours: float = 24.0  # a forced rotation's deadline
    rotation_url: str = "/keys/rotate"  # where an owner rotates a key (the Sunset Link header)
    webhook_max_attempts: int = 15  # deliveries retried with backoff (~4 h), then marked failed
    webhook_timeout_s: float = 10.0

    # billing: a month's invoices finalize this many days after it ends
    billing_grace_days: int = 3
    billing_auto_finalize: bool = True  # workers finalize months past their grace period
    # usage threshold notifications (80 %/100 % of the daily quota and of a spend limit)
    usage_notices_enabled: bool = True
    usage_notices_check_s: float = 10.0  # quotas this often; spend limits every 6 checks

    # local stack (`metering stack`, dev tooling only)
    stack_dir: str = ""  # pid files, logs, Kafka's jars and data; "" = <repository>/.stack
    kafka_heap: str = "-Xms256m -Xmx512m"
    kafka_controller_port: int = 0  # 0 = the Kafka port + 1

    # event policy
    max_future_skew_s: int = 300
    retention_days: int = 90
    # expired raw-log months are first written here (gzip CSV + manifest) by
    # `metering db maintain`; "" = no archive (workers then drop them themselves)
    archive_dir: str = ""
    partitions_ahead_months: int = 2

    @property
    def state_topic(self) -> str:
        """The rules' state topic: the setting, or one named after the worker's group."""
        return self.detection_state_topic or f"{self.worker_id}-detection-state"

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
        """Every setting against its allowed range; the first failure is one line
        naming the variable, its value and what is allowed."""
        for name, (ok, allowed) in _RULES.items():
            value = getattr(self, name)
            try:
                good = ok(value)
            except Exception:  # a rule that cannot even read the value refuses it
                good = False
            if not good:
                shown = "(set)" if name == "key_pepper" else repr(_without_password(value))
                raise ConfigurationError(f"{PREFIX}{name.upper()}={shown}: must be {allowed}")
        topics = {
            self.events_topic, self.dlq_topic, self.alerts_topic, self.state_topic
        }  # fmt: skip
        if len(topics) != 4:
            raise ConfigurationError(
                "METERING_EVENTS_TOPIC, METERING_DLQ_TOPIC, METERING_ALERTS_TOPIC and "
                "METERING_DETECTION_STATE_TOPIC must be four different topics"
            )


def _between(lo: float, hi: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: lo <= v <= hi), f"between {lo:g} and {hi:g}"


def _host_ports(value: str) -> bool:
    """host[:port][,host[:port]...]; a missing port means Kafka's 9092."""
    parts = [p.strip() for p in value.split(",")]
    for part in parts:
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "9092")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return False
    return bool(parts)


def _without_password(value: Any) -> Any:
    """A URL's password never goes into an error message."""
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1]:
        scheme, rest = value.split("://", 1)
        userinfo, host = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in userinfo else value
    return value


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def _bind_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(value))


def _cidrs(value: str) -> bool:
    for item in value.split(","):
        if item.strip():
            ipaddress.ip_network(item.strip(), strict=False)  # ValueError: not a CIDR
    return True


def _detection_rules(value: str) -> bool:
    from metering.detect.rules import parse_overrides  # the rules own their names

    parse_overrides(value)  # InputError: refused
    return True


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_topic = (lambda v: bool(_TOPIC.match(v))), "a Kafka topic name ([A-Za-z0-9._-], 1-249 chars)"

# field -> (check, what is allowed). A test holds every field to having a rule.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kafka_bootstrap": (_host_ports, "host[:port][,host[:port]...] with ports 1-65535"),
    "database_url": (
        lambda v: v.startswith(("postgres://", "postgresql://")),
        "a postgresql:// URL",
    ),
    "redis_url": (
        lambda v: v.startswith(("redis://", "rediss://", "unix://")),
        "a redis://, rediss:// or unix:// URL",
    ),
    "events_topic": _topic,
    "dlq_topic": _topic,
    "alerts_topic": _topic,
    "events_partitions": _between(1, 10_000),
    "replication_factor": _between(1, 32),
    "worker_id": ((lambda v: bool(_NAME.match(v))), "a name of [A-Za-z0-9._-], 1-200 chars"),
    "batch_size": _between(1, 100_000),
    "batch_within_s": ((lambda v: 0 < v <= 60), "> 0 and <= 60"),
    "writers": _between(1, 16),
    # the broker refuses what its group.min/max.session.timeout.ms (6-1800 s by
    # default) exclude, with its own error
    "session_timeout_s": _between(1, 3600),
    "worker_instance_id": (
        (lambda v: v == "" or bool(_NAME.match(v))),
        "empty, or a name of [A-Za-z0-9._-], 1-200 chars, unique per worker",
    ),
    "reconcile_interval_s": _between(1, 86_400),
    "db_command_timeout_s": _between(1, 3600),
    "web_enabled": ((lambda v: isinstance(v, bool)), "true or false"),
    "web_port": _between(1, 65_535),
    "web_bind": (_bind_address, "an IP address or a host name"),
    "redis_key_prefix": (
        # {hash tags} are allowed: they keep keys together on Redis Cluster
        (lambda v: bool(v) and not any(c.isspace() or c in "*?[]" for c in v)),
        "non-empty, without spaces or *?[]",
    ),
    "key_pepper": ((lambda v: isinstance(v, str)), "a string"),
    # 0 would make Redis refuse SET EX 0: every request on the Redis-down path
    "key_cache_ttl_s": _between(1, 86_400),
    "negative_cache_ttl_s": _between(1, 86_400),
    "rotation_grace_hours": _between(0, 8_760),
    "anonymous_per_day": _between(1, 10_000_000),
    "auth_failures_per_minute": _between(1, 100_000),
    "ipv6_bucket_prefix": _between(16, 128),
    "edge_instances": _between(1, 10_000),
    "redis_failure_mode": ((lambda v: v in ("open", "closed")), "'open' or 'closed'"),
    "last_used_flush_s": ((lambda v: 0 < v <= 3600), "> 0 and <= 3600"),
    "trusted_proxies": (_cidrs, "comma-separated CIDRs (e.g. 10.0.0.0/8,192.0.2.7)"),
    "producer_linger_ms": _between(0, 5_000),
    "producer_buffer": _between(1, 10_000_000),
    "producer_unbilled_buffer": _between(1, 10_000_000),
    "refused_records_per_minute": _between(0, 1_000_000),
    "detection_enabled": ((lambda v: isinstance(v, bool)), "true or false"),
    "detection_rules": (
        lambda v: _detection_rules(v),
        'a JSON object of detection thresholds (see docs/anomalies.md), e.g. {"spike_factor": 6}',
    ),
    "detection_state_topic": (
        (lambda v: v == "" or bool(_TOPIC.match(v))),
        "empty, or a Kafka topic name",
    ),
    "detection_checkpoint_s": ((lambda v: 0.1 <= v <= 3600), ">= 0.1 and <= 3600"),
    "detection_revoke": ((lambda v: isinstance(v, bool)), "true or false"),
    "forced_rotation_hours": ((lambda v: 0 < v <= 8_760), "> 0 and <= 8760"),
    "rotation_url": (
        (lambda v: bool(v) and v.isprintable() and " " not in v and ">" not in v),
        "a URL or path without spaces",
    ),
    "webhook_max_attempts": _between(1, 100),
    "webhook_timeout_s": ((lambda v: 0 < v <= 300), "> 0 and <= 300"),
    "billing_grace_days": _between(0, 60),
    "billing_auto_finalize": ((lambda v: isinstance(v, bool)), "true or false"),
    "usage_notices_enabled": ((lambda v: isinstance(v, bool)), "true or false"),
    "usage_notices_check_s": ((lambda v: 0.1 <= v <= 3600), ">= 0.1 and <= 3600"),
    "stack_dir": ((lambda v: isinstance(v, str) and "\0" not in v), "a directory path"),
    "archive_dir": ((lambda v: isinstance(v, str) and "\0" not in v), "a directory path"),
    "kafka_heap": (
        (lambda v: all(p.startswith("-X") for p in v.split())),
        "JVM heap options such as -Xms256m -Xmx512m",
    ),
    "kafka_controller_port": ((lambda v: v == 0 or 1 <= v <= 65_535), "0 or a port 1-65535"),
    "max_future_skew_s": _between(0, 86_400),
    "retention_days": _between(1, 3_650),
    "partitions_ahead_months": _between(0, 24),
}


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
