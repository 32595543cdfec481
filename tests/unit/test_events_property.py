"""Property-based: whatever the bytes, ``decode`` returns a valid event or raises
``InvalidEventError``, never anything else (a stray exception would stop the
worker on that record for good)."""

from __future__ import annotations

import ipaddress
import json
import math
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metering.errors import InvalidEventError
from metering.events import (
    MAX_ENDPOINT_LEN,
    MAX_RECORD_BYTES,
    MAX_RESPONSE_TIME_MS,
    MAX_UNITS,
    REQUIRED_FIELDS,
    TimePolicy,
    UsageEvent,
    decode,
)
from tests.unit.test_events import record  # a valid v1 record, overridable

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = TimePolicy(now=NOW)
FIELDS = (*REQUIRED_FIELDS, "bytes_out", "units")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)

# Values near the edges each field has: the ones a validator trips over.
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59),
        timezones=st.just(UTC),
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "0001-01-01T00:30:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:59.999999+00:00",
            "2026-11-23T11:59:00Z",
            "2026-11-23",
            "2026-11-23T11:59:00",
            "2026-13-40T99:99:99Z",
            "\x00",
        ]
    ),
    st.text(max_size=40),
)
ips = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(
        ["203.0.113.7\x00", "\x00", "::1%eth0", "1.2.3", "", "::ffff:1.2.3.4", "1" * 5000]
    ),
    st.text(max_size=50),
)
uuids = st.one_of(st.uuids().map(str), st.none(), st.text(max_size=40), st.just("\x00" * 36))
field_values = {
    "event_id": uuids,
    "occurred_at": timestamps,
    "user_id": uuids,
    "api_key_id": uuids,
    "endpoint": st.one_of(st.text(max_size=1100), st.just("/v1/\x00"), st.just("/" * 1025)),
    "method": st.one_of(st.sampled_from(["GET", "POST", "get", ""]), st.text(max_size=8)),
    "status_code": st.one_of(st.integers(min_value=-1000, max_value=2**64 - 1), st.floats()),
    "response_time_ms": st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
    ),
    "client_ip": ips,
    "bytes_out": st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    "units": st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats()),
    "schema_version": st.one_of(st.just(1), st.integers(), st.text(max_size=3)),
}
contract_objects = st.fixed_dictionaries(
    {},
    optional={name: st.one_of(field_values[name], json_values) for name in FIELDS},
).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
        lambda extra: {**extra, **d}
    )
)


def check(raw: bytes | None) -> None:
    try:
        event = decode(raw, POLICY)
    except InvalidEventError as exc:
        assert exc.reason and isinstance(exc.detail, str)
        # decode's safety net turns an exception no check foresaw into a
        # dead letter; here it firing means a check to fix
        assert not exc.detail.startswith("record could not be validated"), exc.detail
        return
    assert_storable(event)


def assert_storable(event: UsageEvent) -> None:
    """What PostgreSQL relies on: every value fits its column and encodes."""
    assert isinstance(event.event_id, uuid.UUID)
    assert event.occurred_at.tzinfo is not None and event.occurred_at.utcoffset() == timedelta(0)
    assert NOW - timedelta(days=91) <= event.occurred_at <= NOW + timedelta(seconds=300)
    assert event.user_id is not None or event.api_key_id is None
    assert 1 <= len(event.endpoint) <= MAX_ENDPOINT_LEN and "\x00" not in event.endpoint
    event.endpoint.encode("utf-8")
    assert 100 <= event.status_code <= 599
    assert math.isfinite(event.response_time_ms)
    assert 0 <= event.response_time_ms <= MAX_RESPONSE_TIME_MS
    ipaddress.ip_address(event.client_ip)
    assert event.bytes_out is None or 0 <= event.bytes_out < 2**63
    assert 0 <= event.units <= MAX_UNITS < 2**31


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\x00")
@example(b"\xff\xfe")
@example(b"[" * 2000)
@example(b'"\\ud800"')
@example(b"1e400")
@example(b" " * (MAX_RECORD_BYTES + 1))
def test_arbitrary_bytes_decode_or_are_rejected(raw: bytes) -> None:
    check(raw)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(contract_objects)
def test_arbitrary_contract_objects_decode_or_are_rejected(obj: dict[str, object]) -> None:
    check(json.dumps(obj).encode())


@settings(max_examples=300)
@given(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), field_values[f])))
def test_one_field_changed_from_a_valid_event(change: tuple[str, object]) -> None:
    """Closer to the contract than random objects: one field off a valid event."""
    name, value = change
    check(json.dumps(record(**{name: value})).encode())


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"client_ip": "203.0.113.7\x00"}, "is not an IP address"),  # inet_pton: ValueError
        ({"occurred_at": "0001-01-01T00:30:00+01:00"}, "outside the supported date range"),
        ({"occurred_at": "9999-12-31T23:59:59-01:00"}, "outside the supported date range"),
    ],
)
def test_the_records_that_used_to_crash_the_worker(
    overrides: dict[str, object], detail: str
) -> None:
    with pytest.raises(InvalidEventError) as caught:
        decode(orjson.dumps(record(**overrides)), POLICY)
    assert caught.value.reason == "bad_value" and detail in caught.value.detail


def test_an_unforeseen_failure_is_still_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net: a check that raises something unexpected rejects the record."""
    from metering import events

    def broken(text: str) -> bool:
        raise RuntimeError("a check with a bug")

    monkeypatch.setattr(events, "is_ip", broken)
    with pytest.raises(InvalidEventError) as caught:
        decode(orjson.dumps(record()), POLICY)
    assert caught.value.reason == "bad_value" and "RuntimeError" in caught.value.detail
