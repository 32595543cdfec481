"""The usage pipeline: one batch of raw Kafka records in, committed usage out.

Plain async code with no Faust in it: the stream agent hands each batch to
:meth:`UsagePipeline.process`, and tests and benchmarks call it directly.

Per batch:

* decode + validate every record; invalid ones become dead letters (the
  original bytes, key and headers, plus ``x-dlq-*`` headers with the reason)
  and are published before the batch is acknowledged;
* write the valid ones with :class:`~metering.db.usage.UsageWriter` (one
  transaction, deduplicated by event id);
* set the Redis counters to the committed daily totals.

Failure policy:

* PostgreSQL unreachable: reconnect and retry with capped backoff for as
  long as it takes; the batch is not acknowledged meanwhile, so Kafka
  keeps the events (the consumer simply stops advancing);
* PostgreSQL rejects the data itself (a value the contract let through but
  a constraint does not): the batch is retried one event at a time and the
  rejected events become dead letters (``rejected_by_database``);
* Redis unreachable: counters are skipped, the pipeline keeps going, and
  the next :meth:`reconcile` rebuilds them from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol, TypeVar

import asyncpg

from metering.counters import DailyTotal, UsageCounters
from metering.db import connect, is_connection_error
from metering.db.migrate import maintain_partitions
from metering.db.usage import UsageWriter, WriteResult
from metering.errors import InvalidEventError, ServiceUnavailable
from metering.events import TimePolicy, UsageEvent, decode

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as consumed, before decoding."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int | None = None
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: RawRecord
    reason: str
    detail: str

    def headers(self) -> Headers:
        """Original headers plus the reason and where the record came from."""
        extra = [
            ("x-dlq-reason", self.reason.encode()),
            ("x-dlq-detail", self.detail.encode()[:1024]),
            ("x-dlq-source-topic", self.record.topic.encode()),
            ("x-dlq-source-partition", str(self.record.partition).encode()),
            ("x-dlq-source-offset", str(self.record.offset).encode()),
            ("x-dlq-failed-at", datetime.now(UTC).isoformat().encode()),
        ]
        return [*self.record.headers, *extra]


class DeadLetterSink(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Durably publish the letters (return only once the broker has them)."""


@dataclass(slots=True)
class PipelineStats:
    batches: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    db_retries: int = 0
    redis_failures: int = 0
    rebuilds: int = 0
    first_batch_at: float | None = None  # wall clock when the first batch began
    last_batch_at: float | None = None  # wall clock when the last batch was committed
    last_batch_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    inserted: int
    duplicates: int
    dead_letters: int
    totals: list[DailyTotal]


class _Connection:
    """One PostgreSQL connection and its writer (the writer's temp table lives on it)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self._writer: UsageWriter | None = None

    async def writer(self) -> UsageWriter:
        if self._writer is None or self.conn is None or self.conn.is_closed():
            self.conn = await connect(self._dsn)
            self._writer = UsageWriter(self.conn)
        return self._writer

    def forget_partitions(self) -> None:
        if self._writer is not None:
            self._writer.forget_partitions()

    def drop(self) -> None:
        conn, self.conn, self._writer = self.conn, None, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self.conn, self._writer = self.conn, None, None
        if conn is not None and not conn.is_closed():
            await conn.close()


class UsagePipeline:
    """Batches in, committed usage out. ``writers`` batches may be in flight at once,
    each on its own connection (the stream runs that many agent actors)."""

    def __init__(
        self,
        *,
        database_url: str,
        counters: UsageCounters,
        dead_letters: DeadLetterSink,
        policy: Callable[[], TimePolicy] = TimePolicy,
        writers: int = 1,
        retention_days: int = 90,
        partitions_ahead_months: int = 2,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._counters = counters
        self._dead_letters = dead_letters
        self._policy = policy
        self._retention_days = retention_days
        self._ahead = partitions_ahead_months
        self._max_backoff = max_backoff_s
        self._sleep = sleep
        self._slots = [_Connection(database_url) for _ in range(max(1, writers))]
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        for slot in self._slots:
            self._idle.put_nowait(slot)
        self._redis_dirty = True  # rebuild check on the first reconcile
        self._stopped = False
        self.stats = PipelineStats()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect eagerly (optional: every path connects on first use)."""
        self._stopped = False
        for slot in self._slots:
            await slot.writer()

    async def stop(self) -> None:
        self._stopped = True
        for slot in self._slots:
            await slot.close()

    async def __aenter__(self) -> UsagePipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the batch path ----------------------------------------------------

    async def process(self, records: Sequence[RawRecord]) -> BatchResult:
        started = time.perf_counter()
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
        policy = self._policy()
        events: list[UsageEvent] = []
        sources: dict[int, RawRecord] = {}
        letters: list[DeadLetter] = []
        for rec in records:
            try:
                event = decode(rec.value, policy)
            except InvalidEventError as exc:
                letters.append(DeadLetter(rec, exc.reason, exc.detail))
                continue
            events.append(event)
            sources[id(event)] = rec

        slot = await self._idle.get()
        try:
            result, rejected = await self._write(slot, events, sources)
        finally:
            self._idle.put_nowait(slot)
        letters.extend(rejected)
        if letters:
            await self._retry("dead-letter publish", lambda: self._dead_letters.send(letters))
            for letter in letters:
                self.stats.dead_letters[letter.reason] += 1
        await self._publish_counters(result.totals)

        s = self.stats
        s.batches += 1
        s.records += len(records)
        s.inserted += result.inserted
        s.duplicates += result.duplicates
        s.last_batch_at = time.time()
        s.last_batch_seconds = time.perf_counter() - started
        return BatchResult(
            len(records), result.inserted, result.duplicates, len(letters), result.totals
        )

    async def _write(
        self, slot: _Connection, events: list[UsageEvent], sources: dict[int, RawRecord]
    ) -> tuple[WriteResult, list[DeadLetter]]:
        if not events:
            return WriteResult(0, 0, []), []

        async def write(batch: Sequence[UsageEvent]) -> WriteResult:
            return await (await slot.writer()).write(batch)

        try:
            return await self._retry("PostgreSQL write", lambda: write(events), slot.drop), []
        except asyncpg.PostgresError as exc:
            log.warning("batch rejected by PostgreSQL (%s); isolating bad events", exc.sqlstate)

        # Data error somewhere in the batch: find it one event at a time.
        inserted, totals, letters = 0, {}, []
        for e in events:
            try:
                one = await self._retry("PostgreSQL write", partial(write, [e]), slot.drop)
            except asyncpg.PostgresError as exc:
                letters.append(
                    DeadLetter(sources[id(e)], "rejected_by_database", f"{exc.sqlstate}: {exc}")
                )
                continue
            inserted += one.inserted
            for t in one.totals:
                totals[(t.user_id, t.day)] = t
        written = len(events) - len(letters)
        return WriteResult(written, inserted, list(totals.values())), letters

    async def _retry(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        on_failure: Callable[[], None] | None = None,
    ) -> T:
        """Retry connection-level failures with capped exponential backoff, forever."""
        delay = 0.2
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not (isinstance(exc, ServiceUnavailable) or is_connection_error(exc)):
                    raise
                if self._stopped:
                    raise
                self.stats.db_retries += 1
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                if on_failure is not None:
                    on_failure()
                await self._sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def _publish_counters(self, totals: list[DailyTotal]) -> None:
        if not totals:
            return
        try:
            await self._counters.publish(totals)
        except ServiceUnavailable as exc:
            self.stats.redis_failures += 1
            self._redis_dirty = True
            log.warning("Redis counters not updated (%s); will rebuild from PostgreSQL", exc)

    # -- housekeeping (called from a timer) ---------------------------------

    async def reconcile(self) -> None:
        """Keep partitions ahead, drop expired ones, rebuild Redis if it lost its data."""
        slot = await self._idle.get()
        try:
            await slot.writer()
            assert slot.conn is not None
            _, dropped = await maintain_partitions(
                slot.conn, months_ahead=self._ahead, retention_days=self._retention_days
            )
            if dropped:
                for other in self._slots:
                    other.forget_partitions()
                log.info("dropped expired usage_logs partitions: %s", ", ".join(dropped))
            if self._redis_dirty or not await self._counters.is_synced():
                n = await self._counters.rebuild(slot.conn)
                self._redis_dirty = False
                self.stats.rebuilds += 1
                log.info("rebuilt %d Redis usage counters from PostgreSQL", n)
        except ServiceUnavailable as exc:
            log.warning("reconcile skipped: %s", exc)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            slot.drop()
            log.warning("reconcile skipped: %s", exc)
        finally:
            self._idle.put_nowait(slot)
