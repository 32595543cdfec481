"""UsagePipeline against real PostgreSQL and Redis (dead letters collected in a list)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis.asyncio as aioredis

from metering.events import TimePolicy, UsageEvent
from metering.usage.counters import UsageCounters
from metering.usage.deadletters import DeadLetter, RawRecord
from metering.usage.pipeline import UsagePipeline


class CollectedLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


def event(user: uuid.UUID | None, at: datetime, **kw: object) -> UsageEvent:
    fields: dict[str, object] = dict(
        user_id=user,
        api_key_id=None,
        endpoint="/v1/search",
        method="GET",
        status_code=200,
        response_time_ms=10.0,
        client_ip="203.0.113.9",
        units=1,
        occurred_at=at,
    )
    fields.update(kw)
    return UsageEvent.new(**fields)  # type: ignore[arg-type]


def raw(events: Sequence[UsageEvent]) -> list[RawRecord]:
    return [
        RawRecord(value=e.to_json(), topic="t", partition=0, offset=i) for i, e in enumerate(events)
    ]


def pipeline_for(database_url, redis_client, redis_prefix, **kw) -> UsagePipeline:
    """A pipeline on the test's database and Redis prefix, dead letters collected."""
    return UsagePipeline(
        database_url=database_url,
        counters=kw.pop("counters", None) or UsageCounters(redis=redis_client, prefix=redis_prefix),
        dead_letters=kw.pop("dead_letters", None) or CollectedLetters(),
        max_backoff_s=0.2,
        **kw,
    )


@pytest.fixture
async def pipeline(database_url, redis_client, redis_prefix):
    p = pipeline_for(database_url, redis_client, redis_prefix)
    p.letters = p._dead_letters  # type: ignore[attr-defined]
    async with p:
        yield p


async def test_duplicates_in_a_batch_and_replays_count_once(
    pipeline, db, redis_client, redis_prefix
):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    events = [event(user, now - timedelta(seconds=i)) for i in range(50)]
    batch = raw(events + events[:10])  # exact duplicates inside one batch
    r1 = await pipeline.process(batch)
    assert (r1.inserted, r1.duplicates) == (50, 10)
    r2 = await pipeline.process(raw(events))  # the whole batch redelivered
    assert (r2.inserted, r2.duplicates) == (0, 50)
    assert await db.fetchval("SELECT count(*) FROM usage_logs") == 50
    assert await db.fetchval("SELECT sum(request_count) FROM daily_usage") == 50
    counters = UsageCounters(redis=redis_client, prefix=redis_prefix)
    days = {e.occurred_at.date() for e in events}
    total = 0
    for d in days:
        t = await counters.get(user, d)
        assert t is not None
        total += t.requests
    assert total == 50


async def test_year_boundary_buckets_and_partitions_created_on_demand(
    database_url, db, redis_client, redis_prefix
):
    # A fixed clock just after New Year 2028: no partition exists for these months yet.
    policy = TimePolicy(now=datetime(2028, 1, 1, 0, 1, tzinfo=UTC))
    p = UsagePipeline(
        database_url=database_url,
        counters=UsageCounters(redis=redis_client, prefix=redis_prefix),
        dead_letters=CollectedLetters(),
        policy=lambda: policy,
    )
    user = uuid.uuid4()
    last_ms = datetime(2027, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    first_ms = datetime(2028, 1, 1, 0, 0, 0, tzinfo=UTC)
    async with p:
        await p.process(raw([event(user, last_ms), event(user, last_ms), event(user, first_ms)]))
    rows = await db.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) FROM usage_logs GROUP BY 1 ORDER BY 1"
    )
    assert [(r["part"], r["count"]) for r in rows] == [
        ("usage_logs_y2027m12", 2),
        ("usage_logs_y2028m01", 1),
    ]
    days = await db.fetch("SELECT date, request_count FROM daily_usage ORDER BY date")
    assert [(str(r["date"]), r["request_count"]) for r in days] == [
        ("2027-12-31", 2),
        ("2028-01-01", 1),
    ]
    # the SQL naming function agrees with the Python one
    assert (
        await db.fetchval("SELECT usage_logs_partition_name($1)", last_ms) == "usage_logs_y2027m12"
    )


async def test_invalid_records_become_dead_letters_and_the_rest_lands(pipeline, db):
    user = uuid.uuid4()
    good = event(user, datetime.now(UTC))
    records = [
        RawRecord(
            value=b"nope", topic="t", partition=2, offset=41, key=b"k", headers=[("trace", b"abc")]
        ),
        RawRecord(value=good.to_json(), topic="t", partition=2, offset=42),
        RawRecord(value=None, topic="t", partition=2, offset=43),
    ]
    result = await pipeline.process(records)
    assert (result.inserted, result.dead_letters) == (1, 2)
    letters = pipeline.letters.letters
    assert [(dl.record.offset, dl.reason) for dl in letters] == [
        (41, "invalid_json"),
        (43, "empty_record"),
    ]
    headers = dict(letters[0].headers())
    assert headers["trace"] == b"abc"  # the original headers are kept
    assert headers["x-dlq-reason"] == b"invalid_json"
    assert headers["x-dlq-source-offset"] == b"41"
    assert letters[0].record.value == b"nope"  # untouched
    assert pipeline.stats.dead_letters == {"invalid_json": 1, "empty_record": 1}


async def test_an_event_the_database_refuses_is_isolated(pipeline, db):
    # A constraint the contract does not know about stands in for any data error.
    await db.execute(
        "ALTER TABLE usage_logs ADD CONSTRAINT no_teapots CHECK (endpoint <> '/teapot')"
    )
    user = uuid.uuid4()
    now = datetime.now(UTC)
    events = [event(user, now), event(user, now, endpoint="/teapot"), event(user, now)]
    result = await pipeline.process(raw(events))
    assert result.inserted == 2
    [letter] = pipeline.letters.letters
    assert letter.reason == "rejected_by_database"
    assert letter.detail.startswith("23514")  # check_violation
    assert orjson.loads(letter.record.value)["endpoint"] == "/teapot"
    assert await db.fetchval("SELECT request_count FROM daily_usage") == 2


async def test_lost_database_connection_is_retried_without_loss(pipeline, db):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    await pipeline.process(raw([event(user, now)]))
    # Kill the pipeline's backend, as a PostgreSQL restart or failover would.
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert killed == 1
    result = await pipeline.process(raw([event(user, now), event(user, now)]))
    assert result.inserted == 2
    assert pipeline.stats.db_retries >= 1
    assert await db.fetchval("SELECT request_count FROM daily_usage") == 3


async def test_redis_outage_does_not_stop_the_pipeline_and_is_repaired(
    database_url, db, redis_client, redis_prefix
):
    dead_redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    user = uuid.uuid4()
    now = datetime.now(UTC)
    p = UsagePipeline(
        database_url=database_url,
        counters=UsageCounters(redis=dead_redis, prefix=redis_prefix),
        dead_letters=CollectedLetters(),
    )
    async with p:
        result = await p.process(raw([event(user, now), event(user, now)]))
    await dead_redis.aclose()
    assert result.inserted == 2 and p.stats.redis_failures == 1
    # Redis back: a reconcile re-derives the counter from PostgreSQL.
    healthy = UsagePipeline(
        database_url=database_url,
        counters=UsageCounters(redis=redis_client, prefix=redis_prefix),
        dead_letters=CollectedLetters(),
    )
    async with healthy:
        await healthy.reconcile()
    t = await UsageCounters(redis=redis_client, prefix=redis_prefix).get(user, now.date())
    assert t is not None and t.requests == 2


async def test_counters_never_move_backwards(redis_client, redis_prefix):
    from metering.usage.counters import DailyTotal

    counters = UsageCounters(redis=redis_client, prefix=redis_prefix)
    user, day = uuid.uuid4(), datetime.now(UTC).date()
    await counters.publish([DailyTotal(user, day, 10, 12, 1)])
    await counters.publish([DailyTotal(user, day, 7, 8, 0)])  # a stale total arriving late
    t = await counters.get(user, day)
    assert t is not None and (t.requests, t.units, t.errors) == (10, 12, 1)
    ttl = await redis_client.ttl(counters.key(user, day))
    assert 0 < ttl <= 3 * 86400


async def test_throttled_requests_are_counted_apart(pipeline, db, redis_client, redis_prefix):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    events = [
        event(user, now),
        event(user, now, status_code=429, units=0, rejected="rate_limited"),  # the edge's
        event(user, now, status_code=404),
    ]
    await pipeline.process(raw(events))
    row = await db.fetchrow(
        "SELECT request_count, client_error_count, throttled_count, rejected_count FROM daily_usage"
    )
    assert tuple(row) == (3, 2, 1, 1)
    t = await UsageCounters(redis=redis_client, prefix=redis_prefix).get(user, now.date())
    assert t is not None and (t.requests, t.errors, t.throttled, t.rejected) == (3, 2, 1, 1)
    # the quota function counts served requests only ("today" by PostgreSQL's
    # clock: the row is moved there in one transaction, so 00:00 UTC passing
    # between the write and the check cannot change the answer)
    async with db.transaction():
        await db.execute(
            "UPDATE daily_usage SET date = (now() AT TIME ZONE 'UTC')::date WHERE user_id = $1",
            user,
        )
        assert await db.fetchval("SELECT check_quota_exceeded($1, 2)", user) is True
        assert await db.fetchval("SELECT check_quota_exceeded($1, 3)", user) is False


async def test_the_last_seconds_of_a_month_land_on_their_own_day_and_month(
    database_url, db, redis_client, redis_prefix
):
    """A run at 23:59:30 UTC on the last day of a month (the clock injected):
    events either side of midnight go to their own day and month partition,
    and a Redis rebuild at that moment restores both days."""
    clock = datetime(2027, 1, 31, 23, 59, 30, tzinfo=UTC)
    policy = TimePolicy(now=clock)
    user = uuid.uuid4()
    before = datetime(2027, 1, 31, 23, 59, 29, 999999, tzinfo=UTC)
    after = datetime(2027, 2, 1, 0, 0, 10, tzinfo=UTC)  # 40 s ahead: inside the skew
    counters = UsageCounters(redis=redis_client, prefix=redis_prefix)
    p = UsagePipeline(
        database_url=database_url,
        counters=counters,
        dead_letters=CollectedLetters(),
        policy=lambda: policy,
    )
    async with p:
        result = await p.process(
            raw([event(user, before), event(user, before), event(user, after)])
        )
        assert (result.inserted, result.dead_letters) == (3, 0)
        keys = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}:*")]
        await redis_client.delete(*keys)  # Redis restarted empty, at 23:59:30
        await p.reconcile()
    rows = await db.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) FROM usage_logs GROUP BY 1 ORDER BY 1"
    )
    assert [(r["part"], r["count"]) for r in rows] == [
        ("usage_logs_y2027m01", 2),
        ("usage_logs_y2027m02", 1),
    ]
    jan = await counters.get(user, before.date())
    feb = await counters.get(user, after.date())
    assert jan is not None and jan.requests == 2
    assert feb is not None and feb.requests == 1
