import json
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources

import orjson
import pytest

from metering.errors import InvalidEventError
from metering.events import (
    HTTP_METHODS,
    MAX_ENDPOINT_LEN,
    MAX_RECORD_BYTES,
    MAX_RESPONSE_TIME_MS,
    MAX_UNITS,
    REJECTION_REASON,
    REQUIRED_FIELDS,
    TimePolicy,
    UsageEvent,
    decode,
    validate,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def record(**overrides):
    base = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2026-11-23T11:59:00.250000Z",
        "user_id": str(uuid.uuid4()),
        "api_key_id": str(uuid.uuid4()),
        "endpoint": "/v1/search",
        "method": "GET",
        "status_code": 200,
        "response_time_ms": 12.5,
        "client_ip": "203.0.113.7",
        "bytes_out": 512,
        "units": 1,
        "schema_version": 1,
        "rejected": None,
        "count": 1,
    }
    base.update(overrides)
    return base


def test_valid_record_round_trips():
    raw = record()
    event = decode(orjson.dumps(raw), TimePolicy(now=NOW))
    assert event.occurred_at == datetime(2026, 11, 23, 11, 59, 0, 250000, tzinfo=UTC)
    assert orjson.loads(event.to_json()) == raw


def test_offsets_are_normalised_to_utc():
    event = validate(record(occurred_at="2026-11-23T13:30:00+01:30"))
    assert event.occurred_at == datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_optional_fields_default():
    raw = record()
    del raw["bytes_out"], raw["units"]
    event = validate(raw)
    assert event.bytes_out is None and event.units == 1


def test_anonymous_event_is_keyed_by_its_prefix():
    # one worker sees every failed authentication of a /24 (IPv6: /48)
    event = validate(record(user_id=None, api_key_id=None))
    assert event.partition_key == b"anon:203.0.113.0/24"
    v6 = validate(record(user_id=None, api_key_id=None, client_ip="2001:db8:1:2::9"))
    assert v6.partition_key == b"anon:2001:db8:1::/48"
    keyed = validate(record())
    assert keyed.partition_key == str(keyed.user_id).encode()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"status_code": 99}, "bad_value"),
        ({"status_code": 600}, "bad_value"),
        ({"status_code": "200"}, "bad_type"),
        ({"status_code": True}, "bad_type"),
        ({"status_code": 200.0}, "bad_type"),
        ({"response_time_ms": -0.1}, "bad_value"),
        ({"response_time_ms": 3_600_001}, "bad_value"),
        ({"response_time_ms": "fast"}, "bad_type"),
        ({"event_id": "not-a-uuid"}, "bad_value"),
        ({"event_id": None}, "bad_type"),
        ({"user_id": 42}, "bad_type"),
        ({"user_id": None}, "bad_value"),  # a key id without a user
        ({"occurred_at": "yesterday"}, "bad_value"),
        ({"occurred_at": "2026-11-23T11:59:00"}, "bad_value"),  # no offset
        ({"occurred_at": "2026-11-23"}, "bad_value"),
        ({"occurred_at": 1732363140}, "bad_type"),
        ({"method": "get"}, "bad_value"),
        ({"method": "BREW"}, "bad_value"),
        ({"endpoint": ""}, "bad_type"),
        ({"endpoint": "/x" * 600}, "bad_value"),
        ({"endpoint": "/a\x00b"}, "bad_value"),
        ({"client_ip": "999.1.1.1"}, "bad_value"),
        ({"client_ip": None}, "bad_type"),
        ({"bytes_out": -1}, "bad_value"),
        ({"bytes_out": 1.5}, "bad_type"),
        ({"units": -1}, "bad_value"),
        ({"units": 2_000_000_000}, "bad_value"),
        ({"schema_version": 2}, "unsupported_version"),
    ],
)
def test_contract_violations_are_rejected_with_a_reason(overrides, reason):
    with pytest.raises(InvalidEventError) as err:
        validate(record(**overrides))
    assert err.value.reason == reason
    [field] = overrides
    # the detail names the field at fault (a key id without a user names both)
    assert field in str(err.value) or (field == "user_id" and "api_key_id" in str(err.value))
    assert str(err.value) == err.value.detail


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_required_field(field):
    raw = record()
    del raw[field]
    with pytest.raises(InvalidEventError) as err:
        validate(raw)
    assert err.value.reason == "missing_field"
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty_record"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "bad_type"),
        (b"x" * (MAX_RECORD_BYTES + 1), "too_large"),
    ],
)
def test_undecodable_records(raw, reason):
    with pytest.raises(InvalidEventError) as err:
        decode(raw)
    assert err.value.reason == reason


def test_record_of_exactly_the_limit_is_measured_not_rejected_for_size():
    raw = orjson.dumps(record())
    padded = raw[:-1] + b"," + b'"pad":"' + b"p" * (MAX_RECORD_BYTES - len(raw) - 9) + b'"}'
    assert len(padded) == MAX_RECORD_BYTES
    event = decode(padded)  # unknown fields are ignored (forward compatible)
    assert str(event.event_id) == orjson.loads(raw)["event_id"]
    with pytest.raises(InvalidEventError) as err:
        decode(padded[:-1] + b" }")  # one byte more
    assert err.value.reason == "too_large"


def test_time_policy_future_and_late():
    policy = TimePolicy(now=NOW)

    def at(ts: str) -> UsageEvent:
        return decode(orjson.dumps(record(occurred_at=ts)), policy)

    assert at("2026-11-23T12:05:00Z").occurred_at == NOW + timedelta(minutes=5)  # skew edge
    with pytest.raises(InvalidEventError) as err:
        at("2026-11-23T12:05:00.000001Z")
    assert err.value.reason == "future_timestamp"
    # late but inside retention: accepted, counted on its own (UTC) day; the
    # oldest accepted instant is the start of the day 90 days back
    oldest = datetime(2026, 8, 25, tzinfo=UTC)
    assert NOW - timedelta(days=90) - oldest < timedelta(days=1)
    assert at(oldest.isoformat()).occurred_at.date() == oldest.date()
    # the UTC date decides, not the emitter's local date
    assert at("2026-08-25T23:30:00-02:00").occurred_at.date() == datetime(2026, 8, 26).date()
    with pytest.raises(InvalidEventError):
        at("2026-08-25T01:30:00+02:00")  # Aug 25 locally, Aug 24 in UTC: too old
    with pytest.raises(InvalidEventError) as err:
        at("2026-08-24T23:59:59.999999Z")
    assert err.value.reason == "too_old"


def test_new_builds_a_valid_event_and_refuses_naive_times():
    event = UsageEvent.new(
        user_id=uuid.uuid4(),
        api_key_id=None,
        endpoint="/v1/x",
        method="POST",
        status_code=201,
        response_time_ms=3,
        client_ip="::1",
    )
    assert validate(orjson.loads(event.to_json())) == event
    with pytest.raises(ValueError):
        UsageEvent.new(
            user_id=None,
            api_key_id=None,
            endpoint="/v1/x",
            method="GET",
            status_code=200,
            response_time_ms=1,
            client_ip="::1",
            occurred_at=datetime(2026, 1, 1),
        )


def test_json_schema_matches_the_python_contract():
    schema = json.loads(
        resources.files("metering").joinpath("schemas/usage_event.v1.json").read_text()
    )
    assert schema["required"] == list(REQUIRED_FIELDS)
    props = schema["properties"]
    assert set(props["method"]["enum"]) == HTTP_METHODS
    assert (props["status_code"]["minimum"], props["status_code"]["maximum"]) == (100, 599)
    assert props["schema_version"]["const"] == 1
    assert set(props) == set(record())
    assert props["endpoint"]["maxLength"] == MAX_ENDPOINT_LEN
    assert props["response_time_ms"]["maximum"] == MAX_RESPONSE_TIME_MS
    assert props["units"]["maximum"] == MAX_UNITS
    assert props["bytes_out"]["maximum"] == 2**62
    assert props["rejected"]["pattern"] == REJECTION_REASON.pattern


def test_rejected_is_a_reason_or_null():
    policy = TimePolicy(now=NOW)
    event = decode(orjson.dumps(record(rejected="forbidden_ip", units=5)), policy)
    assert event.rejected == "forbidden_ip"
    assert orjson.loads(event.to_json())["rejected"] == "forbidden_ip"
    assert orjson.loads(decode(orjson.dumps(record()), policy).to_json())["rejected"] is None
    missing = record()
    del missing["rejected"]  # optional: producers before it are still valid
    assert decode(orjson.dumps(missing), policy).rejected is None
    for bad, reason in ((7, "bad_type"), ("Forbidden IP", "bad_value"), ("", "bad_value")):
        with pytest.raises(InvalidEventError) as caught:
            decode(orjson.dumps(record(rejected=bad)), policy)
        assert caught.value.reason == reason


def test_count_summarises_only_refused_requests():
    policy = TimePolicy(now=NOW)
    summary = record(user_id=None, api_key_id=None, rejected="missing_key", count=40, units=0)
    assert decode(orjson.dumps(summary), policy).count == 40
    assert decode(orjson.dumps(record(rejected="rate_limited", count=7)), policy).count == 7
    for bad in (
        record(count=2),  # a user's served request
        record(user_id=None, api_key_id=None, count=2),  # served anonymous
        record(user_id=None, api_key_id=None, rejected="x", count=0),
        record(user_id=None, api_key_id=None, rejected="x", count=True),
    ):
        with pytest.raises(InvalidEventError):
            decode(orjson.dumps(bad), policy)
