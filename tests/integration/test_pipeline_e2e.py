"""The spine, end to end: real Kafka -> faust worker -> PostgreSQL + Redis.

Exact duplicates, a worker killed with SIGKILL, its group's offsets then
rewound to the start (the worst case of a crash between the PostgreSQL
commit and the offset commit: Kafka redelivers everything), producer
re-sends after the restart, and malformed records. Afterwards each distinct valid event is in
usage_logs once, daily_usage equals an independent count, Redis equals
daily_usage, and the DLQ holds every bad record with its reason.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from metering.edge.producer import UsageProducer
from metering.events import UsageEvent
from metering.usage.counters import UsageCounters
from tests.integration.conftest import eventually

USERS = [uuid.uuid4() for _ in range(4)]


def make_events(rng: random.Random, n: int, now: datetime) -> list[UsageEvent]:
    # Spread over three UTC days, including the last millisecond of yesterday.
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    times = [
        midnight - timedelta(milliseconds=1),
        midnight - timedelta(days=1, hours=3),
        now - timedelta(minutes=5),
        now - timedelta(seconds=1),
    ]
    out = []
    for i in range(n):
        user = None if i % 25 == 0 else rng.choice(USERS)
        out.append(
            UsageEvent.new(
                user_id=user,
                api_key_id=None if user is None else uuid.uuid5(user, "key"),
                endpoint=rng.choice(["/v1/search", "/v1/items/{id}", "/v1/batch"]),
                method=rng.choice(["GET", "POST"]),
                status_code=rng.choice([200, 200, 200, 201, 404, 429, 500]),
                response_time_ms=round(rng.uniform(0.5, 300), 3),
                client_ip=f"203.0.113.{rng.randint(1, 254)}",
                bytes_out=rng.randint(0, 10_000),
                units=rng.choice([1, 1, 1, 5]),
                occurred_at=times[i % len(times)],
            )
        )
    return out


def bad_records(now: datetime) -> list[tuple[bytes | None, str]]:
    good = UsageEvent.new(
        user_id=USERS[0],
        api_key_id=None,
        endpoint="/v1/x",
        method="GET",
        status_code=200,
        response_time_ms=1,
        client_ip="203.0.113.1",
    ).to_dict()
    return [
        (b"{definitely not json", "invalid_json"),
        (orjson.dumps({k: v for k, v in good.items() if k != "endpoint"}), "missing_field"),
        (orjson.dumps({**good, "status_code": 700, "event_id": str(uuid.uuid4())}), "bad_value"),
        (
            orjson.dumps({**good, "response_time_ms": -5, "event_id": str(uuid.uuid4())}),
            "bad_value",
        ),
        (
            orjson.dumps(
                {
                    **good,
                    "event_id": str(uuid.uuid4()),
                    "occurred_at": (now + timedelta(hours=2)).isoformat(),
                }
            ),
            "future_timestamp",
        ),
        (orjson.dumps({**good, "event_id": str(uuid.uuid4()), "pad": "x" * 17_000}), "too_large"),
        (None, "empty_record"),
    ]


async def rewind_group(s) -> None:
    """Commit offset 0 on every partition for the worker's consumer group.

    Retries until the killed member's session has expired and the group is empty."""
    group = f"{s.worker_id}-usage-events"
    parts = [TopicPartition(s.events_topic, p) for p in range(s.events_partitions)]

    async def rewound() -> bool:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(parts)
            await consumer.commit({tp: 0 for tp in parts})
            return True
        except KafkaError:
            return False  # the dead member still holds the group
        finally:
            await consumer.stop()

    await eventually(rewound, timeout=30, what="the consumer group to be rewound", interval=1)


def expected_daily(
    events: list[UsageEvent],
) -> dict[tuple[uuid.UUID, object], tuple[int, int, int]]:
    req: Counter[tuple[uuid.UUID, object]] = Counter()
    units: Counter[tuple[uuid.UUID, object]] = Counter()
    errors: Counter[tuple[uuid.UUID, object]] = Counter()
    for e in events:
        if e.user_id is None:
            continue
        k = (e.user_id, e.occurred_at.astimezone(UTC).date())
        req[k] += 1
        units[k] += e.units
        errors[k] += e.status_code >= 400
    return {k: (req[k], units[k], errors[k]) for k in req}


@pytest.mark.timeout(600)  # its own bounded waits add up to more than the default 300 s
async def test_exactly_once_across_duplicates_crash_and_redelivery(
    kafka_settings, db, redis_client, worker_factory
):
    s = kafka_settings
    rng = random.Random(7)
    now = datetime.now(UTC)
    first = make_events(rng, 1200, now)
    second = make_events(rng, 800, now)
    bad = bad_records(now)

    producer = UsageProducer(bootstrap_servers=s.kafka_bootstrap, topic=s.events_topic, linger_ms=5)
    await producer.start()
    try:
        for i, e in enumerate(first):
            assert producer.emit(e)
            if i % 10 == 0:  # exact duplicates, as a producer retry would send
                assert producer.emit(e)
        for raw, _ in bad:
            assert producer.emit_raw(b"bad", raw)
        await producer.flush(timeout=30)

        w1 = worker_factory(s, METERING_BATCH_SIZE="300")

        async def first_written() -> bool:
            w1.assert_running()
            return await db.fetchval("SELECT count(*) FROM usage_logs") == len(first)

        await eventually(first_written, timeout=90, what="worker 1 to write the first events")
        w1.kill()
        # As if the crash came after the PostgreSQL commits but before any
        # offset commit: the group restarts from the beginning of the topic.
        await rewind_group(s)

        # Producer re-sends part of what was already delivered, plus new events.
        for e in first[:300]:
            assert producer.emit(e)
        for e in second:
            assert producer.emit(e)
        await producer.flush(timeout=30)
    finally:
        await producer.stop()

    w2 = worker_factory(s, METERING_RECONCILE_INTERVAL_S="1")
    valid = first + second
    total_records = len(first) + len(first) // 10 + 300 + len(second) + len(bad)

    async def all_consumed() -> bool:
        w2.assert_running()
        try:
            m = await w2.metrics()
        except OSError:
            return False
        # everything in the topic, i.e. the redelivered first part as well
        return m.get("metering_records_total", 0) >= total_records

    await eventually(all_consumed, timeout=120, what="worker 2 to consume every record")
    m = await w2.metrics()
    # The crash left no committed offsets: worker 2 re-read all of it and
    # recognised every already-written event as a duplicate.
    assert m["metering_events_inserted_total"] == len(second)
    assert m["metering_events_duplicate_total"] >= len(first) + len(first) // 10 + 300
    # every committed batch was timed into the histogram
    assert m["metering_batch_duration_seconds_count"] == m["metering_batches_total"] > 0

    # usage_logs: each distinct valid event exactly once
    rows = await db.fetch("SELECT event_id FROM usage_logs")
    assert len(rows) == len(valid)
    assert {r["event_id"] for r in rows} == {e.event_id for e in valid}

    # daily_usage equals an independent count
    want = expected_daily(valid)
    got = {
        (r["user_id"], r["date"]): (r["request_count"], r["units"], r["errors"])
        for r in await db.fetch(
            "SELECT user_id, date, request_count, units,"
            " client_error_count + server_error_count AS errors FROM daily_usage"
        )
    }
    assert got == want
    assert len({d for _, d in want}) >= 2  # the fixture really spans several UTC days

    # Redis counters equal daily_usage
    counters = UsageCounters(redis=redis_client, prefix=s.redis_key_prefix)
    for (user, day), (requests, units, errors) in want.items():
        t = await counters.get(user, day)
        assert t is not None and (t.requests, t.units, t.errors) == (requests, units, errors)

    # Redis restarted empty: counters come back from PostgreSQL, not doubled.
    keys = [k async for k in redis_client.scan_iter(match=f"{s.redis_key_prefix}:*")]
    await redis_client.delete(*keys)

    async def rebuilt() -> bool:
        # "today" as of this check, not as of the test's start: a run that
        # crosses 00:00 UTC must not wait for a day the worker no longer keeps hot
        hot_from = datetime.now(UTC).date() - timedelta(days=1)
        for (user, day), (requests, _, _) in want.items():
            if day < hot_from:
                continue  # only today and yesterday are kept hot
            t = await counters.get(user, day)
            if t is None or t.requests != requests:
                return False
        return True

    await eventually(rebuilt, timeout=30, what="Redis counters to be rebuilt")

    # DLQ: every bad record, untouched, with its reason (the crash may have
    # sent some twice: dead letters are at-least-once).
    consumer = AIOKafkaConsumer(
        s.dlq_topic,
        bootstrap_servers=s.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    seen: dict[bytes | None, str] = {}
    try:

        async def dlq_complete() -> bool:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                for msg in msgs:
                    headers = dict(msg.headers)
                    seen[msg.value] = headers["x-dlq-reason"].decode()
                    assert headers["x-dlq-source-topic"].decode() == s.events_topic
                    assert headers["x-dlq-detail"]
            return len(seen) == len(bad)

        await eventually(dlq_complete, timeout=30, what="all bad records in the DLQ")
    finally:
        await consumer.stop()
    assert seen == {raw: reason for raw, reason in bad}
    assert m['metering_dead_letters_total{reason="invalid_json"}'] >= 1


async def test_graceful_restart_commits_and_redelivers_nothing(kafka_settings, db, worker_factory):
    s = kafka_settings
    rng = random.Random(11)
    producer = UsageProducer(bootstrap_servers=s.kafka_bootstrap, topic=s.events_topic)
    await producer.start()
    try:
        for e in make_events(rng, 500, datetime.now(UTC)):
            producer.emit(e)
        await producer.flush(timeout=30)

        w1 = worker_factory(s)

        async def written(n: int) -> bool:
            return await db.fetchval("SELECT count(*) FROM usage_logs") == n

        await eventually(lambda: written(500), timeout=60, what="500 events written")
        assert w1.stop() == 0  # SIGTERM: finish, commit, leave the group, exit 0

        for e in make_events(rng, 50, datetime.now(UTC)):
            producer.emit(e)
        await producer.flush(timeout=30)
    finally:
        await producer.stop()

    w2 = worker_factory(s)

    async def caught_up() -> bool:
        w2.assert_running()
        try:
            return (await w2.metrics()).get("metering_records_total", 0) >= 50
        except OSError:
            return False

    await eventually(caught_up, timeout=60, what="worker 2 to read the new events")
    m = await w2.metrics()
    assert m["metering_records_total"] == 50  # nothing from before the restart came back
    assert m["metering_events_duplicate_total"] == 0
    assert await written(550)
