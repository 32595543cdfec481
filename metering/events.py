"""The usage event contract (v1): one definition for producers and the stream.

Wire format: one JSON object per Kafka record on ``usage.events``, keyed by
``user_id`` (anonymous requests: keyed by ``client_ip``). The JSON Schema for
non-Python emitters is ``metering/schemas/usage_event.v1.json``; the Python
rules below are the authority and a unit test keeps the two in step.

Time policy (see docs/events.md):

* ``occurred_at`` is the event time; daily buckets are its UTC date.
* up to ``max_future_skew_s`` (default 300 s) ahead of the worker clock is
  accepted as clock skew; further ahead is rejected (``future_timestamp``);
* late events are accepted and counted on the day they occurred as long as
  that day is inside the raw-log retention (default 90 days); older ones
  are rejected (``too_old``) because their partition may be gone.

Rejected records go to the dead-letter topic untouched, with the reason.
"""

from __future__ import annotations

import math
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from metering.addresses import prefix_of
from metering.errors import InvalidEventError

try:  # asyncpg's C UUID: a uuid.UUID subclass, ~8x faster to parse
    from asyncpg.pgproto.pgproto import UUID as _UUID
except ImportError:  # pragma: no cover
    _UUID = uuid.UUID
parse_uuid = _UUID

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_RESPONSE_TIME_MS = 3_600_000.0  # an hour: anything slower is a clock bug
MAX_UNITS = 1_000_000_000
REJECTION_REASON = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_ENDPOINT_LEN = 1024
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
REQUIRED_FIELDS = (
    "event_id",
    "occurred_at",
    "user_id",
    "api_key_id",
    "endpoint",
    "method",
    "status_code",
    "response_time_ms",
    "client_ip",
    "schema_version",
)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One API request, as metered."""

    event_id: uuid.UUID
    occurred_at: datetime  # aware, UTC
    user_id: uuid.UUID | None  # None: anonymous or failed authentication
    api_key_id: uuid.UUID | None
    endpoint: str
    method: str
    status_code: int
    response_time_ms: float
    client_ip: str
    bytes_out: int | None = None
    units: int = 1
    schema_version: int = SCHEMA_VERSION
    # set when the edge refused the request (forbidden_ip, rate_limited ...):
    # recorded, never billable, never counted against the quota
    rejected: str | None = None
    # >1: a summary of this many alike refused requests from one client (a key,
    # or an address or IPv6 prefix) within one minute
    count: int = 1

    @classmethod
    def new(
        cls,
        *,
        user_id: uuid.UUID | str | None,
        api_key_id: uuid.UUID | str | None,
        endpoint: str,
        method: str,
        status_code: int,
        response_time_ms: float,
        client_ip: str,
        bytes_out: int | None = None,
        units: int = 1,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | None = None,
        rejected: str | None = None,
    ) -> UsageEvent:
        """Build and validate an event at the edge (fresh id, now as event time)."""
        record: dict[str, Any] = {
            "event_id": str(event_id or uuid.uuid4()),
            "occurred_at": _rfc3339(occurred_at or datetime.now(UTC)),
            "user_id": None if user_id is None else str(user_id),
            "api_key_id": None if api_key_id is None else str(api_key_id),
            "endpoint": endpoint,
            "method": method,
            "status_code": status_code,
            "response_time_ms": response_time_ms,
            "client_ip": client_ip,
            "bytes_out": bytes_out,
            "units": units,
            "schema_version": SCHEMA_VERSION,
        }
        record["rejected"] = rejected
        return validate(record)

    @property
    def partition_key(self) -> bytes:
        """Kafka key: the user (one worker owns each user's counters and keys);
        without one, the client's prefix (IPv4 /24, IPv6 /48), so one worker
        sees every failed authentication of a prefix."""
        if self.user_id is not None:
            return str(self.user_id).encode()
        return ("anon:" + prefix_of(self.client_ip)).encode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "occurred_at": _rfc3339(self.occurred_at),
            "user_id": None if self.user_id is None else str(self.user_id),
            "api_key_id": None if self.api_key_id is None else str(self.api_key_id),
            "endpoint": self.endpoint,
            "method": self.method,
            "status_code": self.status_code,
            "response_time_ms": self.response_time_ms,
            "client_ip": self.client_ip,
            "bytes_out": self.bytes_out,
            "units": self.units,
            "schema_version": self.schema_version,
            "rejected": self.rejected,
            "count": self.count,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class TimePolicy:
    """Which event times the pipeline accepts, relative to ``now``."""

    max_future_skew: timedelta = timedelta(seconds=300)
    retention: timedelta = timedelta(days=90)
    now: datetime | None = field(default=None)  # fixed clock for tests

    def check(self, occurred_at: datetime) -> None:
        now = self.now or datetime.now(UTC)
        if occurred_at > now + self.max_future_skew:
            raise InvalidEventError(
                "future_timestamp",
                f"occurred_at {_rfc3339(occurred_at)} is more than "
                f"{int(self.max_future_skew.total_seconds())}s in the future",
            )
        oldest = (now - self.retention).replace(hour=0, minute=0, second=0, microsecond=0)
        if occurred_at < oldest:
            raise InvalidEventError(
                "too_old",
                f"occurred_at {_rfc3339(occurred_at)} is older than the "
                f"{self.retention.days}-day retention",
            )


def decode(raw: bytes | None, policy: TimePolicy | None = None) -> UsageEvent:
    """Parse and validate one Kafka record value."""
    if raw is None:
        raise InvalidEventError("empty_record", "record has no value (tombstone)")
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidEventError(
            "too_large", f"record is {len(raw)} bytes; the limit is {MAX_RECORD_BYTES}"
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError("invalid_json", f"not valid JSON: {exc}") from None
    try:
        event = validate(data)
        if policy is not None:
            policy.check(event.occurred_at)
    except InvalidEventError:
        raise
    except Exception as exc:
        # Whatever the bytes, a record is an event or a reason, never a crash:
        # a check that trips over a value it did not foresee rejects the record.
        raise InvalidEventError(
            "bad_value", f"record could not be validated ({type(exc).__name__}: {exc})"[:1024]
        ) from None
    return event


def validate(data: Any) -> UsageEvent:
    """Check a decoded JSON object against the v1 contract."""
    if not isinstance(data, dict):
        raise InvalidEventError("bad_type", "event must be a JSON object")
    for name in REQUIRED_FIELDS:
        if name not in data:
            raise InvalidEventError("missing_field", f"missing required field {name!r}")

    version = data["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidEventError(
            "unsupported_version", f"schema_version must be {SCHEMA_VERSION}, got {version!r}"
        )

    event_id = _uuid(data, "event_id", nullable=False)
    assert event_id is not None
    occurred_at = _timestamp(data["occurred_at"])
    user_id = _uuid(data, "user_id", nullable=True)
    api_key_id = _uuid(data, "api_key_id", nullable=True)
    if api_key_id is not None and user_id is None:
        raise InvalidEventError("bad_value", "api_key_id is set but user_id is null")

    endpoint = data["endpoint"]
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidEventError("bad_type", "endpoint must be a non-empty string")
    if len(endpoint) > MAX_ENDPOINT_LEN:
        raise InvalidEventError("bad_value", f"endpoint longer than {MAX_ENDPOINT_LEN} chars")
    if "\x00" in endpoint:
        raise InvalidEventError("bad_value", "endpoint contains a NUL character")

    method = data["method"]
    if not isinstance(method, str) or method not in HTTP_METHODS:
        raise InvalidEventError(
            "bad_value", f"method must be an upper-case HTTP method, got {method!r}"
        )

    status = data["status_code"]
    if type(status) is not int:
        raise InvalidEventError("bad_type", "status_code must be an integer")
    if not 100 <= status <= 599:
        raise InvalidEventError("bad_value", f"status_code {status} is outside 100-599")

    latency = data["response_time_ms"]
    if type(latency) not in (int, float):
        raise InvalidEventError("bad_type", "response_time_ms must be a number")
    if not math.isfinite(latency) or latency < 0 or latency > MAX_RESPONSE_TIME_MS:
        raise InvalidEventError(
            "bad_value", f"response_time_ms {latency} is outside 0-{MAX_RESPONSE_TIME_MS:.0f}"
        )

    client_ip = data["client_ip"]
    if not isinstance(client_ip, str):
        raise InvalidEventError("bad_type", "client_ip must be a string")
    if not is_ip(client_ip):
        raise InvalidEventError("bad_value", f"client_ip {client_ip!r} is not an IP address")

    bytes_out = data.get("bytes_out")
    if bytes_out is not None:
        if type(bytes_out) is not int:
            raise InvalidEventError("bad_type", "bytes_out must be an integer or null")
        if bytes_out < 0 or bytes_out > 2**62:
            raise InvalidEventError("bad_value", f"bytes_out {bytes_out} is out of range")

    units = data.get("units", 1)
    if type(units) is not int:
        raise InvalidEventError("bad_type", "units must be an integer")
    if not 0 <= units <= MAX_UNITS:
        raise InvalidEventError("bad_value", f"units {units} is outside 0-{MAX_UNITS}")

    rejected = data.get("rejected")
    if rejected is not None:
        if not isinstance(rejected, str):
            raise InvalidEventError("bad_type", "rejected must be a string or null")
        if not REJECTION_REASON.match(rejected):
            raise InvalidEventError("bad_value", "rejected must be a reason like forbidden_ip")

    count = data.get("count", 1)
    if type(count) is not int:
        raise InvalidEventError("bad_type", "count must be an integer")
    if not 1 <= count <= MAX_UNITS:
        raise InvalidEventError("bad_value", f"count {count} is outside 1-{MAX_UNITS}")
    if count > 1 and rejected is None:
        raise InvalidEventError("bad_value", "only refused requests are summarised (count > 1)")

    return UsageEvent(
        event_id=event_id,
        occurred_at=occurred_at,
        user_id=user_id,
        api_key_id=api_key_id,
        endpoint=endpoint,
        method=method,
        status_code=status,
        response_time_ms=float(latency),
        client_ip=client_ip,
        bytes_out=bytes_out,
        units=units,
        schema_version=version,
        rejected=rejected,
        count=count,
    )


def _uuid(data: dict[str, Any], name: str, *, nullable: bool) -> uuid.UUID | None:
    value = data[name]
    if value is None:
        if nullable:
            return None
        raise InvalidEventError("bad_type", f"{name} must not be null")
    if not isinstance(value, str):
        raise InvalidEventError("bad_type", f"{name} must be a UUID string")
    try:
        return _UUID(value)
    except ValueError:
        raise InvalidEventError("bad_value", f"{name} {value!r} is not a UUID") from None


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 address (fast: inet_pton)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):  # ValueError: a NUL in the string
            pass
    return False


def _timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidEventError("bad_type", "occurred_at must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEventError("bad_value", f"occurred_at {value!r} is not RFC 3339") from None
    if parsed.tzinfo is None or "T" not in value.upper():
        raise InvalidEventError(
            "bad_value", f"occurred_at {value!r} needs a date, a time and a UTC offset"
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:30:00+01:00 is before year 1 in UTC
        raise InvalidEventError(
            "bad_value", f"occurred_at {value!r} is outside the supported date range"
        ) from None


def _rfc3339(ts: datetime) -> str:
    if ts.tzinfo is None:
        raise ValueError("naive datetime: event times must be timezone-aware")
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
