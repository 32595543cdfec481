"""The real worker through real Kafka under faults: poison records between valid
events, a database that turns read-only for 10 s, and a drain that outlasts
the rebalance timeout. The worker must stay up, land every valid event once
and dead-letter exactly the poison records."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from metering.events import UsageEvent
from tests.integration.conftest import eventually


def valid_events(n: int, users: list[uuid.UUID]) -> list[UsageEvent]:
    now = datetime.now(UTC)
    return [
        UsageEvent.new(
            user_id=users[i % len(users)],
            api_key_id=None,
            endpoint="/v1/items",
            method="GET",
            status_code=200,
            response_time_ms=3.0,
            client_ip="203.0.113.5",
            occurred_at=now - timedelta(seconds=i),
        )
        for i in range(n)
    ]


async def publish(s, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(s.events_topic, value, key=key)
    finally:
        await producer.stop()


async def dlq_size(s) -> int:
    """Records ever written to the DLQ topic (one partition: its end offset)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(s.dlq_topic, 0)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def database_read_only(db) -> AsyncIterator[None]:
    """A demoted primary: every session opened from now on is read-only (the
    open ones are cut), until the block ends."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        await db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        yield
    finally:
        await db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


async def wait_until_a_write_waits_on_a_lock(db) -> None:
    async def waiting() -> bool:
        return bool(
            await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        )

    await eventually(waiting, timeout=30, what="a worker's batch to wait on the lock")


async def read_dlq(s, *, settle_s: float = 2.0, timeout: float = 30.0) -> list:
    """Everything on the DLQ topic (waits until nothing new arrives for ``settle_s``)."""
    consumer = AIOKafkaConsumer(
        s.dlq_topic,
        bootstrap_servers=s.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    out: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline, quiet_since = loop.time() + timeout, loop.time()
        while loop.time() < deadline and loop.time() - quiet_since < settle_s:
            batch = await consumer.getmany(timeout_ms=300)
            for msgs in batch.values():
                out.extend(msgs)
                if msgs:
                    quiet_since = loop.time()
    finally:
        await consumer.stop()
    return out


async def test_poison_records_between_valid_events_never_stop_the_worker(
    kafka_settings, db, worker_factory
):
    s = kafka_settings
    # a rule PostgreSQL has and the contract does not: rejected_by_database
    await db.execute(
        "ALTER TABLE usage_logs ADD CONSTRAINT no_teapots CHECK (endpoint <> '/teapot')"
    )
    users = [uuid.uuid4() for _ in range(3)]
    events = valid_events(120, users)
    base = events[0].to_dict()

    def variant(**changes: object) -> bytes:
        return orjson.dumps({**base, "event_id": str(uuid.uuid4()), **changes})

    now = datetime.now(UTC)
    huge = b'{"event_id": "' + b"x" * 1_010_000 + b'"}'
    poison: list[tuple[bytes | None, str]] = [
        # every reason the contract knows, plus the database's
        (orjson.dumps({k: v for k, v in base.items() if k != "method"}), "missing_field"),
        (variant(status_code="200"), "bad_type"),
        (variant(method="X" * 5000), "bad_value"),  # its detail is longer than 1 KiB
        (variant(schema_version=2), "unsupported_version"),
        (variant(occurred_at=(now + timedelta(hours=1)).isoformat()), "future_timestamp"),
        (variant(occurred_at=(now - timedelta(days=120)).isoformat()), "too_old"),
        (variant(endpoint="/teapot"), "rejected_by_database"),
        (variant(pad="p" * 17_000), "too_large"),
        (
            orjson.dumps({**base, "event_id": str(uuid.uuid4()), "client_ip": "1.2.3.4\x00"}),
            "bad_value",
        ),
        (
            orjson.dumps(
                {**base, "event_id": str(uuid.uuid4()), "occurred_at": "0001-01-01T00:30:00+01:00"}
            ),
            "bad_value",
        ),
        (huge, "too_large"),
        (b"\xff\xfe\x00", "invalid_json"),
        (None, "empty_record"),
    ]
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, e in enumerate(events):
        records.append((e.partition_key, e.to_json()))
        if i % 8 == 5 and i // 8 < len(poison):
            # the same key as the valid event before it: the same partition
            records.append((e.partition_key, poison[i // 8][0]))
    await publish(s, records)

    worker = worker_factory(s)

    async def landed() -> bool:
        worker.assert_running()
        return await db.fetchval("SELECT count(*) FROM usage_logs") == len(events)

    await eventually(landed, timeout=90, what="every valid event behind the poison records")
    letters = await read_dlq(s)
    worker.assert_running()
    assert len(records) == len(events) + len(poison)  # every poison record was sent
    got = sorted(dict(m.headers)["x-dlq-reason"].decode() for m in letters)
    assert got == sorted(reason for _, reason in poison)
    for m in letters:
        h = dict(m.headers)
        assert 0 < len(h["x-dlq-detail"]) <= 1024  # the detail is cut, never the record
        assert h["x-dlq-source-topic"] == s.events_topic.encode()
        if h.get("x-dlq-truncated") != b"1":
            assert m.value in {p for p, _ in poison}  # byte for byte
    [big] = [m for m in letters if dict(m.headers).get("x-dlq-truncated") == b"1"]
    h = dict(big.headers)
    assert h["x-dlq-original-size"] == str(len(huge)).encode()
    assert h["x-dlq-original-sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert big.value == huge[: len(big.value)] and 0 < len(big.value) < 64 * 1024
    assert sum(r for (r,) in await db.fetch("SELECT request_count FROM daily_usage")) == 120


async def test_a_read_only_database_pauses_the_worker_and_loses_nothing(
    kafka_settings, db, worker_factory
):
    s = kafka_settings
    users = [uuid.uuid4() for _ in range(3)]
    first, second = valid_events(20, users), valid_events(50, users)
    await publish(s, [(e.partition_key, e.to_json()) for e in first])
    worker = worker_factory(s)

    async def count(n: int) -> bool:
        worker.assert_running()
        return await db.fetchval("SELECT count(*) FROM usage_logs") == n

    await eventually(lambda: count(20), timeout=90, what="the first events")
    async with database_read_only(db):
        await publish(s, [(e.partition_key, e.to_json()) for e in second])
        paused_seen = False
        for _ in range(20):  # 10 s read-only
            await asyncio.sleep(0.5)
            assert await db.fetchval("SELECT count(*) FROM usage_logs") == 20
            m = await worker.metrics()
            paused_seen |= m.get("metering_pipeline_paused") == 1
        assert paused_seen
    await eventually(lambda: count(70), timeout=60, what="the events held during the outage")
    m = await worker.metrics()
    assert not any(k.startswith("metering_dead_letters_total") and v for k, v in m.items())
    assert m["metering_pipeline_paused"] == 0 and m["metering_db_retries_total"] >= 1
    assert await dlq_size(s) == 0


async def test_a_drain_longer_than_the_rebalance_timeout_does_not_crash_the_worker(
    kafka_settings, db, worker_factory
):
    """Worker 1's batch is stuck behind a table lock when worker 2 joins; the
    group evicts worker 1 (rebalance timeout = 6 s session timeout) while it
    drains, so its offset commit is refused once the batch lands."""
    s = kafka_settings
    users = [uuid.uuid4() for _ in range(6)]
    first, second = valid_events(20, users), valid_events(30, users)
    await publish(s, [(e.partition_key, e.to_json()) for e in first])
    env = {"METERING_WRITERS": "1", "METERING_DB_COMMAND_TIMEOUT_S": "120"}
    w1 = worker_factory(s, **env)

    async def count(n: int) -> bool:
        return await db.fetchval("SELECT count(*) FROM usage_logs") == n

    await eventually(lambda: count(20), timeout=90, what="the first events")
    lock = db.transaction()
    await lock.start()
    try:
        await db.execute("LOCK TABLE daily_usage IN EXCLUSIVE MODE")  # reads pass, writes wait
        await publish(s, [(e.partition_key, e.to_json()) for e in second])

        await wait_until_a_write_waits_on_a_lock(db)
        w2 = worker_factory(s, **env)

        async def w1_evicted() -> bool:
            # w2 alone owns every partition: w1 missed the rebalance, draining
            w2.assert_running()
            return "usage consumer assigned [0, 1, 2]" in w2.log_path.read_text()

        await eventually(w1_evicted, timeout=60, what="worker 2 to take every partition")
    finally:
        await lock.commit()

    async def all_landed() -> bool:
        w1.assert_running()
        w2.assert_running()
        return await count(50)

    await eventually(all_landed, timeout=60, what="every event once the lock is gone")
    await asyncio.sleep(3)
    w1.assert_running()
    w2.assert_running()
    assert await db.fetchval("SELECT sum(request_count) FROM daily_usage") == 50
    w1_log = w1.log_path.read_text()
    assert "offset commit refused" in w1_log or "handed over" in w1_log


async def test_sigterm_during_an_outage_exits_promptly_and_loses_nothing(
    kafka_settings, db, worker_factory
):
    s = kafka_settings
    users = [uuid.uuid4() for _ in range(3)]
    first, second = valid_events(10, users), valid_events(30, users)
    await publish(s, [(e.partition_key, e.to_json()) for e in first])
    w1 = worker_factory(s)

    async def count(n: int) -> bool:
        return await db.fetchval("SELECT count(*) FROM usage_logs") == n

    await eventually(lambda: count(10), timeout=90, what="the first events")
    async with database_read_only(db):
        await publish(s, [(e.partition_key, e.to_json()) for e in second])

        async def paused() -> bool:
            return (await w1.metrics()).get("metering_pipeline_paused") == 1

        await eventually(paused, timeout=30, what="worker 1 to pause")
        started = asyncio.get_running_loop().time()
        assert w1.stop(timeout=30) == 0  # SIGTERM: give up waiting, commit nothing unwritten
        assert asyncio.get_running_loop().time() - started < 20
        assert "not written and not committed" in w1.log_path.read_text()
    w2 = worker_factory(s)

    async def all_landed() -> bool:
        w2.assert_running()
        return await count(40)

    await eventually(all_landed, timeout=90, what="worker 2 to land what worker 1 could not")
    assert await db.fetchval("SELECT sum(request_count) FROM daily_usage") == 40
    assert await dlq_size(s) == 0


INJECT_BUG = """
import os

if os.environ.get("METERING_TEST_FAULT") == "process-raises":
    import metering.usage.pipeline

    async def broken(self, records):
        raise RuntimeError("injected bug in the pipeline")

    metering.usage.pipeline.UsagePipeline.process = broken
"""


async def test_a_bug_escaping_the_pipeline_stops_the_worker_without_committing(
    kafka_settings, db, worker_factory, tmp_path
):
    """The last line of defence: if process() itself raises (a bug, not a
    record or an outage), the worker exits without committing, so the batch
    is redelivered to the next worker instead of skipped."""
    s = kafka_settings
    events = valid_events(30, [uuid.uuid4() for _ in range(3)])
    await publish(s, [(e.partition_key, e.to_json()) for e in events])
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT_BUG)
    buggy = worker_factory(s, PYTHONPATH=str(inject), METERING_TEST_FAULT="process-raises")

    async def exited() -> bool:
        return buggy.proc is not None and buggy.proc.poll() is not None

    await eventually(exited, timeout=90, what="the worker with the bug to stop")
    assert buggy.proc is not None and buggy.proc.returncode != 0
    assert "injected bug in the pipeline" in buggy.log_path.read_text()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=f"{s.worker_id}-usage-events",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        for p in range(s.events_partitions):
            assert await consumer.committed(TopicPartition(s.events_topic, p)) in (None, 0)
    finally:
        await consumer.stop()
    assert await db.fetchval("SELECT count(*) FROM usage_logs") == 0

    healthy = worker_factory(s)

    async def landed() -> bool:
        healthy.assert_running()
        return await db.fetchval("SELECT count(*) FROM usage_logs") == 30

    await eventually(landed, timeout=90, what="the next worker to land the batch")


async def test_a_worker_joining_mid_stream_takes_over_without_rereading(
    kafka_settings, db, worker_factory
):
    """A rebalance with a batch in flight (held behind a table lock for less
    than the rebalance timeout): the leaving owner finishes and commits it
    before the partitions move, so the newcomer re-reads nothing (no
    duplicates) and every event lands once."""
    s = kafka_settings
    users = [uuid.uuid4() for _ in range(12)]
    first, second = valid_events(200, users), valid_events(300, users)
    await publish(s, [(e.partition_key, e.to_json()) for e in first])
    # a rebalance timeout (= session timeout) no loaded 2-core box can miss
    env = {"METERING_SESSION_TIMEOUT_S": "30"}
    w1 = worker_factory(s, **env)

    async def count(n: int) -> bool:
        w1.assert_running()
        return await db.fetchval("SELECT count(*) FROM usage_logs") == n

    await eventually(lambda: count(200), timeout=90, what="worker 1 to write the first events")
    lock = db.transaction()
    await lock.start()
    try:
        await db.execute("LOCK TABLE daily_usage IN EXCLUSIVE MODE")  # writes wait
        await publish(s, [(e.partition_key, e.to_json()) for e in second])

        await wait_until_a_write_waits_on_a_lock(db)
        w2 = worker_factory(s, **env)

        async def revoking() -> bool:
            w2.assert_running()
            # not the empty revocation every first join starts with
            return re.search(r"usage consumer revoked \[\d", w1.log_path.read_text()) is not None

        await eventually(revoking, timeout=60, what="worker 2's join to revoke worker 1")
    finally:
        await lock.commit()

    async def all_landed() -> bool:
        w2.assert_running()
        return await count(500)

    await eventually(all_landed, timeout=60, what="every event after the rebalance")
    await asyncio.sleep(2)  # a re-read would show up as duplicates by now
    assert await db.fetchval("SELECT sum(request_count) FROM daily_usage") == 500
    m1 = await w1.metrics()

    async def w2_metrics() -> bool:
        try:
            await w2.metrics()
            return True
        except OSError:
            return False

    await eventually(w2_metrics, timeout=30, what="worker 2's metrics")
    m2 = await w2.metrics()
    assert m1["metering_events_duplicate_total"] + m2["metering_events_duplicate_total"] == 0
    assert "offset commit refused" not in w1.log_path.read_text()
