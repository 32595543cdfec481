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
    last_batch_at: float | None = None
    last_batch_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    inserted: int
    duplicates: int
    dead_letters: int
    totals: list[DailyTotal]


class UsagePipeline:
    def __init__(
        self,
        *,
        database_url: str,
        counters: UsageCounters,
        dead_letters: DeadLetterSink,
        policy: Callable[[], TimePolicy] = TimePolicy,
        retention_days: int = 90,
        partitions_ahead_months: int = 2,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._dsn = database_url
        self._counters = counters
        self._dead_letters = dead_letters
        self._policy = policy
        self._retention_days = retention_days
        self._ahead = partitions_ahead_months
        self._max_backoff = max_backoff_s
        self._sleep = sleep
        self._conn: asyncpg.Connection | None = None
        self._writer: UsageWriter | None = None
        self._lock = asyncio.Lock()
        self._redis_dirty = True  # rebuild check on the first reconcile
        self._stopped = False
        self.stats = PipelineStats()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._stopped = False
        await self._writer_or_connect()

    async def stop(self) -> None:
        self._stopped = True
        conn, self._conn, self._writer = self._conn, None, None
        if conn is not None and not conn.is_closed():
            await conn.close()

    async def __aenter__(self) -> UsagePipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the batch path ----------------------------------------------------

    async def process(self, records: Sequence[RawRecord]) -> BatchResult:
        started = time.perf_counter()
        async with self._lock:
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

            result, rejected = await self._write(events, sources)
            letters.extend(rejected)
            if letters:
                await self._retry(
                    "dead-letter publish", lambda: self._dead_letters.send(letters), reconnect=False
                )
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
        return BatchResult(len(records), result.inserted, result.duplicates, len(letters), result.totals)

    async def _write(
        self, events: list[UsageEvent], sources: dict[int, RawRecord]
    ) -> tuple[WriteResult, list[DeadLetter]]:
        if not events:
            return WriteResult(0, 0, []), []
        try:
            return await self._retry("PostgreSQL write", lambda: self._write_once(events)), []
        except asyncpg.PostgresError as exc:
            log.warning("batch rejected by PostgreSQL (%s); isolating bad events", exc.sqlstate)

        # Data error somewhere in the batch: find it one event at a time.
        inserted, totals, letters = 0, {}, []
        for e in events:
            try:
                one = await self._retry("PostgreSQL write", lambda e=e: self._write_once([e]))
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

    async def _write_once(self, events: Sequence[UsageEvent]) -> WriteResult:
        writer = await self._writer_or_connect()
        return await writer.write(events)

    async def _writer_or_connect(self) -> UsageWriter:
        if self._writer is None or self._conn is None or self._conn.is_closed():
            self._conn = await connect(self._dsn)
            self._writer = UsageWriter(self._conn)
        return self._writer

    async def _retry(
        self, what: str, attempt: Callable[[], Awaitable[T]], *, reconnect: bool = True
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
                if reconnect:
                    await self._drop_connection()
                await self._sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def _drop_connection(self) -> None:
        conn, self._conn, self._writer = self._conn, None, None
        if conn is not None:
            conn.terminate()

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
        """Rebuild Redis counters if Redis lost them; keep partitions ahead."""
        async with self._lock:
            try:
                await self._writer_or_connect()
                assert self._conn is not None
                _, dropped = await maintain_partitions(
                    self._conn, months_ahead=self._ahead, retention_days=self._retention_days
                )
                if dropped:
                    log.info("dropped expired usage_logs partitions: %s", ", ".join(dropped))
                if self._redis_dirty or not await self._counters.is_synced():
                    n = await self._counters.rebuild(self._conn)
                    self._redis_dirty = False
                    self.stats.rebuilds += 1
                    log.info("rebuilt %d Redis usage counters from PostgreSQL", n)
            except ServiceUnavailable as exc:
                log.warning("reconcile skipped: %s", exc)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                await self._drop_connection()
                log.warning("reconcile skipped: %s", exc)

