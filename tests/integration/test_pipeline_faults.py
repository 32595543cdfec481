"""The usage pipeline under faults, against real PostgreSQL and Redis.

Poison records, a database that refuses every row (read-only, permissions),
a silent connection, racing partition creation, a lost COMMIT
acknowledgement, a Redis failure during a rebuild, a day's bytes_out past
bigint. Each fails on the code before the pipeline-hardening change.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from metering.errors import ServiceUnavailable
from metering.events import TimePolicy
from metering.usage.counters import UsageCounters
from metering.usage.deadletters import RawRecord
from metering.usage.pipeline import UsagePipeline
from metering.usage.store import UsageWriter
from tests.integration.test_pipeline_db import CollectedLetters, event, pipeline_for, raw


def letters_of(p: UsagePipeline) -> CollectedLetters:
    sink = p._dead_letters
    assert isinstance(sink, CollectedLetters)
    return sink


async def test_poison_records_become_dead_letters_and_the_rest_lands(
    database_url, db, redis_client, redis_prefix
):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    good = [event(user, now - timedelta(seconds=i)) for i in range(6)]
    base = good[0].to_dict()
    poison = [
        orjson.dumps({**base, "event_id": str(uuid.uuid4()), "client_ip": "203.0.113.9\x00"}),
        orjson.dumps(
            {**base, "event_id": str(uuid.uuid4()), "occurred_at": "0001-01-01T00:30:00+01:00"}
        ),
        b"x" * 1_010_010,
    ]
    values = [good[0].to_json(), poison[0], good[1].to_json(), poison[1], good[2].to_json()]
    values += [poison[2], *(e.to_json() for e in good[3:])]
    records = [RawRecord(value=v, topic="t", partition=0, offset=i) for i, v in enumerate(values)]
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        result = await p.process(records)
    assert (result.inserted, result.dead_letters) == (6, 3)
    got = [(dl.record.offset, dl.reason) for dl in letters_of(p).letters]
    assert got == [(1, "bad_value"), (3, "bad_value"), (5, "too_large")]
    assert await db.fetchval("SELECT request_count FROM daily_usage") == 6


async def test_read_only_database_pauses_the_pipeline_and_dead_letters_nothing(
    database_url, db, redis_client, redis_prefix
):
    """25006, what a demoted primary answers: an outage, not the rows' fault."""
    user = uuid.uuid4()
    now = datetime.now(UTC)
    name = await db.fetchval("SELECT current_database()")
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        await p.process(raw([event(user, now)]))
        await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        batch = [event(user, now - timedelta(seconds=i)) for i in range(20)]
        task = asyncio.create_task(p.process(raw(batch)))
        await asyncio.sleep(3)
        assert not task.done()
        assert p.stats.paused_since is not None and "25006" in p.stats.pause_reason
        assert p.stats.db_retries >= 2
        assert letters_of(p).letters == []
        await db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        result = await asyncio.wait_for(task, 15)
    assert (result.inserted, result.dead_letters) == (20, 0)
    assert p.stats.paused_since is None
    assert await db.fetchval("SELECT request_count FROM daily_usage") == 21


async def test_permission_error_pauses_the_pipeline_and_dead_letters_nothing(
    database_url, db, redis_client, redis_prefix
):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        await db.execute("REVOKE INSERT ON usage_logs FROM CURRENT_USER")
        task = asyncio.create_task(p.process(raw([event(user, now), event(user, now)])))
        await asyncio.sleep(2)
        assert not task.done()
        assert "42501" in p.stats.pause_reason
        assert letters_of(p).letters == []
        await db.execute("GRANT INSERT ON usage_logs TO CURRENT_USER")
        result = await asyncio.wait_for(task, 15)
    assert (result.inserted, result.dead_letters) == (2, 0)


class BlackHoleProxy:
    """A loopback TCP proxy that can stop forwarding without closing anything,
    like a NAT entry or a firewall state that vanished. Connections frozen
    stay silent for good; after ``thaw`` new connections forward again."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._frozen = False
        self._live: list[dict[str, bool]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        self._frozen = True
        for state in self._live:
            state["dead"] = True

    def thaw(self) -> None:
        self._frozen = False

    async def close(self) -> None:
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        state = {"dead": self._frozen}
        self._live.append(state)
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not state["dead"]:
                        dst.write(data)
                        await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_silent_connection_becomes_an_outage_and_is_retried(
    database_url, db, redis_client, redis_prefix
):
    parts = urlsplit(database_url)
    proxy = await BlackHoleProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{proxy.port}"
    via_proxy = urlunsplit(parts._replace(netloc=netloc))
    user = uuid.uuid4()
    now = datetime.now(UTC)
    p = pipeline_for(via_proxy, redis_client, redis_prefix, command_timeout_s=1.0)
    try:
        await p.start()
        await p.process(raw([event(user, now)]))
        proxy.freeze()
        task = asyncio.create_task(p.process(raw([event(user, now), event(user, now)])))
        await asyncio.sleep(3.5)
        assert not task.done()
        assert p.stats.paused_since is not None and p.stats.db_retries >= 1
        proxy.thaw()
        result = await asyncio.wait_for(task, 20)
    finally:
        await p.stop()
        await proxy.close()
    assert result.inserted == 2
    assert await db.fetchval("SELECT request_count FROM daily_usage") == 3


async def test_two_sessions_create_the_same_new_month(database_url):
    """The loser of the race waits on the advisory lock, then must not answer 42P07."""
    a = await asyncpg.connect(database_url)
    b = await asyncpg.connect(database_url)
    month = datetime(2031, 5, 10, tzinfo=UTC)
    try:
        tx = a.transaction()
        await tx.start()
        assert await a.fetchval("SELECT ensure_usage_logs_partition($1)", month) == (
            "usage_logs_y2031m05"
        )
        loser = asyncio.create_task(b.fetchval("SELECT ensure_usage_logs_partition($1)", month))
        pid_b = b.get_server_pid()
        for _ in range(100):  # until b waits on the lock a holds
            waiting = await a.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid_b
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting
        await tx.commit()
        assert await asyncio.wait_for(loser, 10) == "usage_logs_y2031m05"
    finally:
        await a.close()
        await b.close()


async def test_writers_racing_for_a_new_month_dead_letter_nothing(
    database_url, db, redis_client, redis_prefix
):
    policy = TimePolicy(now=datetime(2031, 8, 1, 0, 1, tzinfo=UTC))
    pipes = [
        pipeline_for(database_url, redis_client, redis_prefix, policy=lambda: policy, writers=2)
        for _ in range(2)
    ]
    months = [datetime(2031, 7, 31, 23, 0, tzinfo=UTC), datetime(2031, 8, 1, 0, 0, tzinfo=UTC)]
    batches = [[event(uuid.uuid4(), months[(i + j) % 2]) for j in range(300)] for i in range(4)]
    for p in pipes:
        await p.start()
    try:
        results = await asyncio.gather(
            *(pipes[i % 2].process(raw(batch)) for i, batch in enumerate(batches))
        )
    finally:
        for p in pipes:
            await p.stop()
    assert sum(r.inserted for r in results) == 1200
    assert [letters_of(p).letters for p in pipes] == [[], []]


async def test_totals_reach_redis_after_a_lost_commit_acknowledgement(
    database_url, db, redis_client, redis_prefix
):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    counters = UsageCounters(redis=redis_client, prefix=redis_prefix)
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        await p.process(raw([event(user, now) for _ in range(10)]))
        # The next batch commits, but the acknowledgement never reaches the
        # worker: PostgreSQL has it, Redis does not.
        retried = [event(user, now) for _ in range(5)]
        conn = await asyncpg.connect(database_url)
        try:
            await UsageWriter(conn).write(retried)
        finally:
            await conn.close()
        t = await counters.get(user, now.date())
        assert t is not None and t.requests == 10
        result = await p.process(raw(retried))  # Kafka redelivers the batch
    assert result.inserted == 0
    t = await counters.get(user, now.date())
    assert t is not None and t.requests == 15


class GatedCounters(UsageCounters):
    """Real Redis counters; a rebuild can be held open and publishes made to fail."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rebuilding = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False
        self.rebuilds = 0

    async def publish(self, totals: Sequence) -> None:
        if self.fail:
            raise ServiceUnavailable("Redis write failed: injected")
        await super().publish(totals)

    async def rebuild(self, conn, **kw) -> int:
        self.rebuilds += 1
        self.rebuilding.set()
        await self.release.wait()
        return await super().rebuild(conn, **kw)


async def test_a_redis_failure_during_a_rebuild_keeps_the_rebuild_pending(
    database_url, redis_client, redis_prefix
):
    counters = GatedCounters(redis=redis_client, prefix=redis_prefix)
    p = pipeline_for(database_url, redis_client, redis_prefix, counters=counters, writers=2)
    async with p:
        first = asyncio.create_task(p.reconcile())
        await asyncio.wait_for(counters.rebuilding.wait(), 10)
        counters.fail = True
        batch = raw([event(uuid.uuid4(), datetime.now(UTC))])
        await asyncio.wait_for(p.process(batch), 10)  # its counter publish fails
        counters.fail = False
        counters.release.set()
        await asyncio.wait_for(first, 10)
        assert p.stats.redis_failures == 1
        await asyncio.wait_for(p.reconcile(), 10)  # the failure came after the rebuild began
    assert counters.rebuilds == 2


async def test_a_days_bytes_out_can_exceed_bigint(database_url, db, redis_client, redis_prefix):
    user = uuid.uuid4()
    now = datetime.now(UTC)
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        result = await p.process(raw([event(user, now, bytes_out=2**62) for _ in range(3)]))
    assert (result.inserted, result.dead_letters) == (3, 0)
    assert await db.fetchval("SELECT bytes_out FROM daily_usage") == 3 * 2**62


async def test_a_failing_reconcile_is_logged_and_tried_again(
    database_url, db, redis_client, redis_prefix
):
    """Housekeeping never raises into the worker's timer (42P07 used to)."""
    await db.execute("ALTER FUNCTION ensure_usage_logs_partition(timestamptz) RENAME TO parked")
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        await asyncio.wait_for(p.reconcile(), 10)  # 42883: undefined function
        assert p.stats.reconcile_failures == 1 and p.stats.rebuilds == 0
        await db.execute("ALTER FUNCTION parked(timestamptz) RENAME TO ensure_usage_logs_partition")
        await asyncio.wait_for(p.reconcile(), 10)
    assert p.stats.reconcile_failures == 1 and p.stats.rebuilds == 1


async def test_every_event_refused_the_same_way_is_an_outage_not_bad_data(
    database_url, db, redis_client, redis_prefix
):
    """A constraint no event can meet (schema drift in a rolling deploy) must
    not dead-letter a whole batch of valid events."""
    await db.execute("ALTER TABLE usage_logs ADD CONSTRAINT drift CHECK (false) NOT VALID")
    user = uuid.uuid4()
    now = datetime.now(UTC)
    batch = [event(user, now - timedelta(seconds=i)) for i in range(12)]
    async with pipeline_for(database_url, redis_client, redis_prefix) as p:
        task = asyncio.create_task(p.process(raw(batch)))
        try:
            await asyncio.sleep(2)
            assert not task.done()
            assert p.stats.paused_since is not None
            assert letters_of(p).letters == []
        finally:
            await db.execute("ALTER TABLE usage_logs DROP CONSTRAINT drift")
        result = await asyncio.wait_for(task, 20)
    assert (result.inserted, result.dead_letters) == (12, 0)


async def test_a_value_asyncpg_cannot_encode_is_the_rows_fault(database_url):
    """COPY encodes rows client side and raises bare TypeError/OverflowError."""
    from metering.db import RowDataError, is_row_fault
    from metering.events import UsageEvent as Event

    bad = Event(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        user_id=uuid.uuid4(),
        api_key_id=None,
        endpoint="/x",
        method="GET",
        status_code=70_000,  # past smallint: the contract never lets this through
        response_time_ms=1.0,
        client_ip="203.0.113.1",
    )
    conn = await asyncpg.connect(database_url)
    try:
        writer = UsageWriter(conn)
        try:
            await writer.write([bad])
        except RowDataError as exc:
            assert is_row_fault(exc)
        else:
            raise AssertionError("the write should have failed")
        good = event(uuid.uuid4(), datetime.now(UTC))
        assert (await writer.write([good])).inserted == 1  # the connection still works
    finally:
        await conn.close()


class FlakyLetters(CollectedLetters):
    """The dead-letter sink times out twice (a broker away), then takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 2

    async def send(self, letters) -> None:
        if self.failures:
            self.failures -= 1
            raise ServiceUnavailable("dead-letter publish failed: KafkaTimeoutError")
        await super().send(letters)


async def test_a_dead_letter_publish_that_times_out_pauses_and_is_retried(
    database_url, db, redis_client, redis_prefix
):
    sink = FlakyLetters()
    user = uuid.uuid4()
    records = [
        RawRecord(value=event(user, datetime.now(UTC)).to_json(), topic="t", offset=0),
        RawRecord(value=b"{nope", topic="t", offset=1),
    ]
    async with pipeline_for(database_url, redis_client, redis_prefix, dead_letters=sink) as p:
        result = await asyncio.wait_for(p.process(records), 15)
    assert (result.inserted, result.dead_letters) == (1, 1)
    assert [dl.record.offset for dl in sink.letters] == [1]  # delivered once it worked
    assert p.stats.db_retries == 2 and p.stats.paused_since is None
