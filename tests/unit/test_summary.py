"""RefusedSummary: records per client and minute, a cap in all, summaries after."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from metering.addresses import client_bucket
from metering.edge.summary import RefusedSummary
from metering.events import UsageEvent

T0 = datetime(2026, 12, 6, 10, 0, 5, tzinfo=UTC)


def refused(
    ip: str = "198.51.100.1",
    *,
    key: uuid.UUID | None = None,
    at: datetime = T0,
    reason: str = "missing_key",
    endpoint: str = "/v1/x",
) -> UsageEvent:
    return UsageEvent(
        event_id=uuid.uuid4(),
        occurred_at=at,
        user_id=uuid.uuid4() if key else None,
        api_key_id=key,
        endpoint=endpoint,
        method="GET",
        status_code=429 if key else 401,
        response_time_ms=1.0,
        client_ip=ip,
        units=0,
        rejected=reason,
    )


def test_allowance_per_client_then_one_summary_per_minute():
    s = RefusedSummary(allowance=3)
    admitted = [s.admit(refused()) for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert s.admit(refused("198.51.100.2"))  # another client has its own allowance
    assert s.flush(T0) == []  # the minute is not over
    (summary,) = s.flush(T0 + timedelta(minutes=1))
    assert (summary.count, summary.client_ip, summary.rejected, summary.units) == (
        7,
        "198.51.100.1",
        "missing_key",
        0,
    )
    assert summary.occurred_at.minute == 0 and summary.user_id is None


def test_a_client_refused_in_numbers_is_summarised_within_seconds():
    s = RefusedSummary(allowance=3, partial_after_s=2.0, partial_min_count=10)
    for i in range(13):
        s.admit(refused(at=T0 + timedelta(milliseconds=100 * i)))
    s.admit(refused("198.51.100.9", at=T0))  # a light client waits for its minute
    s.admit(refused("198.51.100.9", at=T0))
    s.admit(refused("198.51.100.9", at=T0))
    s.admit(refused("198.51.100.9", at=T0))
    assert s.flush(T0 + timedelta(seconds=1)) == []  # not yet two seconds old
    (early,) = s.flush(T0 + timedelta(seconds=2.5))  # the first summarised came at 0.3 s
    assert early.count == 10 and early.occurred_at == T0 + timedelta(milliseconds=1200)
    s.admit(refused(at=T0 + timedelta(seconds=3)))  # the same minute: a new tally
    rest = s.flush(T0 + timedelta(minutes=1))
    assert sorted((e.client_ip, e.count) for e in rest) == [
        ("198.51.100.1", 1),
        ("198.51.100.9", 1),
    ]


def test_keys_are_clients_and_ipv6_shares_its_prefix():
    key = uuid.uuid4()
    s = RefusedSummary(allowance=1)
    assert s.admit(refused("203.0.113.1", key=key, reason="rate_limited"))
    assert not s.admit(refused("203.0.113.2", key=key, reason="rate_limited", endpoint="/v1/y"))
    assert not s.admit(refused("203.0.113.3", key=key, reason="rate_limited", endpoint="/v1/z"))
    assert s.admit(refused("2001:db8:1:2::1"))
    assert not s.admit(refused("2001:db8:1:2:ffff::9"))
    by_reason = {e.rejected: e for e in s.flush(everything=True)}
    assert by_reason["rate_limited"].api_key_id == key and by_reason["rate_limited"].endpoint == "*"
    assert by_reason["missing_key"].client_ip == "2001:db8:1:2::"
    assert client_bucket("::ffff:192.0.2.9", 64) == "192.0.2.9"


def test_a_cap_on_records_in_all_whatever_the_clients():
    s = RefusedSummary(allowance=10, cap=5)
    admitted = [s.admit(refused(f"198.51.100.{i}")) for i in range(1, 21)]
    assert admitted.count(True) == 5
    assert sum(e.count for e in s.flush(everything=True)) == 15


def test_served_requests_are_never_summarised():
    s = RefusedSummary(allowance=0, cap=0)
    served = refused()
    served = UsageEvent(
        **{**{f: getattr(served, f) for f in served.__dataclass_fields__}, "rejected": None}
    )
    assert s.admit(served)
