"""The usage pipeline: one batch of raw Kafka records in, committed usage out.
Plain async code with no Faust in it: the stream agent hands each batch to
:meth:`UsagePipeline.process`, and tests and benchmarks call it directly.

Per batch:

* decode + validate every record; invalid ones become dead letters (the
  original bytes, key and headers, plus ``x-dlq-*`` headers with the reason)
  and are published before the batch is acknowledged;
* write the valid ones with :class:`~metering.usage.store.UsageWriter` (one
  transaction, deduplicated by event id);
* set the Redis counters to the committed daily totals.

Failure policy (whatever its bytes, a record becomes a counted event or a
dead letter; nothing a record contains can stop the pipeline):

* decoding and validation turn every exception into a reason;
* PostgreSQL unreachable, silent (``command_timeout``) or unwell in a way
  that would fail any row (read-only, permissions, statement timeout, I/O,
  a missing table; see :mod:`metering.db.connect`): the pipeline *pauses*:
  it drops the connection and retries on a new one with capped backoff for
  as long as it takes, logs the outage once and reports it in ``paused_since``;
  the batch is not acknowledged, so Kafka keeps the events. Nothing is dead-lettered;
* PostgreSQL refuses a row's data (SQLSTATE class 22 or 23: a value the
  contract let through but a constraint does not): the batch is split in
  halves until the refused events are alone, and those become dead letters
  (``rejected_by_database``); the rest lands;
* a dead letter too large for the producer goes out truncated (DeadLetter.fitted);
* Redis unreachable: counters are skipped, the pipeline keeps going, and
  the next :meth:`reconcile` rebuilds them from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import asyncpg

from metering.db.connect import describe, is_connection_error, is_row_fault, refusal_cause
from metering.db.lifecycle import maintain
from metering.errors import InvalidEventError, ServiceUnavailable
from metering.events import TimePolicy, UsageEvent, decode
from metering.usage.counters import DailyTotal, UsageCounters
from metering.usage.deadletters import DeadLetter, DeadLetterSink, RawRecord
from metering.usage.store import WriterConnection, WriteResult

log = logging.getLogger(__name__)

T = TypeVar("T")


# This many events or more, all refused for one reason: the schema, not the data.
SYSTEMIC_REJECTION_MIN = 10


class SystemicRejection(ServiceUnavailable):
    """PostgreSQL refused every event of a batch the same way: pause, don't dead-letter."""


@dataclass(slots=True)
class PipelineStats:
    batches: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    db_retries: int = 0  # retries of a batch step during an outage (PostgreSQL or the DLQ)
    redis_failures: int = 0
    rebuilds: int = 0
    reconcile_failures: int = 0
    paused_since: float | None = None  # wall clock when the current outage began
    pause_reason: str = ""
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
        drop_expired: bool = True,  # False: `metering db maintain` archives, then drops
        partitions_ahead_months: int = 2,
        max_backoff_s: float = 30.0,
        command_timeout_s: float = 30.0,
        observe_batch_seconds: Callable[[float], None] | None = None,
        observe_events: Callable[[list[UsageEvent], dict[int, RawRecord]], object] | None = None,
    ) -> None:
        self._counters = counters
        self._observe_events = observe_events  # the detector: each decoded batch, in fetch order
        self._observe_batch = observe_batch_seconds or (lambda seconds: None)
        self._dead_letters = dead_letters
        self._policy = policy
        self._retention_days = retention_days
        self._drop_expired = drop_expired
        self._ahead = partitions_ahead_months
        self._max_backoff = max_backoff_s
        self._slots = [
            WriterConnection(database_url, command_timeout_s) for _ in range(max(1, writers))
        ]
        self._idle: asyncio.Queue[WriterConnection] = asyncio.Queue()
        for slot in self._slots:
            self._idle.put_nowait(slot)
        # Redis needs a rebuild while a failure is newer than the last rebuild started after it
        self._redis_failed_gen = 1  # 1 > 0: rebuild check on the first reconcile
        self._redis_rebuilt_gen = 0
        self._outages = 0  # retry loops currently waiting out an outage
        self._stopped = False
        self._interrupted = asyncio.Event()
        self.stats = PipelineStats()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect eagerly (optional: every path connects on first use)."""
        self._stopped = False
        self._interrupted = asyncio.Event()
        for slot in self._slots:
            await slot.writer()

    def interrupt(self) -> None:
        """Stop waiting out outages (shutdown): a batch that is retrying raises
        its last error at once instead of trying again, so it is not
        acknowledged and Kafka redelivers it. Healthy batches are unaffected."""
        self._stopped = True
        self._interrupted.set()
        if self._outages:
            # an attempt may be blocked on a silent connection: cut it now
            for slot in self._slots:
                slot.drop()

    async def stop(self) -> None:
        self.interrupt()
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
        if self._observe_events is not None:  # before any await: batches stay in order
            self._observe_events(events, sources)
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
        self._observe_batch(s.last_batch_seconds)
        return BatchResult(
            len(records), result.inserted, result.duplicates, len(letters), result.totals
        )

    async def _write(
        self, slot: WriterConnection, events: list[UsageEvent], sources: dict[int, RawRecord]
    ) -> tuple[WriteResult, list[DeadLetter]]:
        if not events:
            return WriteResult(0, 0, []), []

        async def write(batch: Sequence[UsageEvent]) -> WriteResult:
            return await (await slot.writer()).write(batch)

        try:
            return await self._retry("PostgreSQL write", lambda: write(events), slot.drop), []
        except Exception as exc:
            if not is_row_fault(exc):
                raise
            log.warning(
                "batch of %d rejected by PostgreSQL (%s); isolating the refused events",
                len(events),
                describe(exc),
            )
        return await self._retry(
            "PostgreSQL write (isolating refused events)",
            lambda: self._isolate(slot, write, events, sources),
        )

    async def _isolate(
        self,
        slot: WriterConnection,
        write: Callable[[Sequence[UsageEvent]], Awaitable[WriteResult]],
        events: list[UsageEvent],
        sources: dict[int, RawRecord],
    ) -> tuple[WriteResult, list[DeadLetter]]:
        """Halve the batch until the refused events are alone; write the rest."""
        slot.forget_partitions()  # a partition dropped meanwhile is re-created, not blamed on rows
        inserted = 0
        totals: dict[tuple[object, object], DailyTotal] = {}

        async def refusal(part: Sequence[UsageEvent]) -> BaseException | None:
            """Write ``part``; the row fault PostgreSQL answered, or None once written."""
            nonlocal inserted
            try:
                one = await self._retry("PostgreSQL write", partial(write, part), slot.drop)
            except Exception as exc:
                if not is_row_fault(exc):
                    raise
                return exc
            inserted += one.inserted
            for t in one.totals:
                totals[(t.user_id, t.day)] = t
            return None

        refused: list[tuple[UsageEvent, BaseException]] = []
        pending: list[list[UsageEvent]] = [events[len(events) // 2 :], events[: len(events) // 2]]
        while pending:
            part = pending.pop()
            if not part or (exc := await refusal(part)) is None:
                continue
            if len(part) > 1:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
            else:
                refused.append((part[0], exc))
        causes = {refusal_cause(exc) for _, exc in refused}
        if len(refused) == len(events) >= SYSTEMIC_REJECTION_MIN and len(causes) == 1:
            # Every event refused for the same reason: the schema, not the data
            # (valid events passed the contract). Pause instead of dead-lettering.
            raise SystemicRejection(
                f"all {len(events)} events of the batch refused with {describe(refused[0][1])}"
            )
        # A refusal is confirmed by a second attempt before it costs an event
        # its place in billing: the schema may have been fixed during the pass.
        letters = []
        for e, _ in refused:
            if (exc := await refusal([e])) is not None:
                letters.append(DeadLetter(sources[id(e)], "rejected_by_database", describe(exc)))
        written = len(events) - len(letters)
        return WriteResult(written, inserted, list(totals.values())), letters

    async def _retry(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        on_failure: Callable[[], None] | None = None,
    ) -> T:
        """Run ``attempt``; on anything but a row's fault, pause and retry.

        Outages (connection loss, silence, a database that would refuse any
        row, a broker that cannot take the dead letters) are retried with
        capped exponential backoff for as long as they last. So is an
        unexpected exception: it is a bug of ours, not the record's, and
        stalling loses nothing where dead-lettering valid events would.
        """
        delay = 0.2
        paused = False
        try:
            while True:
                try:
                    result = await attempt()
                except Exception as exc:
                    if is_row_fault(exc) or self._stopped:
                        raise
                    self.stats.db_retries += 1
                    self.stats.pause_reason = f"{what}: {describe(exc)}"
                    if not paused:
                        paused = True
                        self._outages += 1
                        if self.stats.paused_since is None:
                            self.stats.paused_since = time.time()
                        expected = is_connection_error(exc)
                        log.error(
                            "pipeline paused: %s failed (%s); retrying until it succeeds",
                            what,
                            describe(exc),
                            exc_info=not expected,
                        )
                    else:
                        log.warning(
                            "%s failed again (%s); retrying in %.1fs", what, describe(exc), delay
                        )
                    if on_failure is not None:
                        on_failure()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._interrupted.wait(), delay)
                    if self._stopped:
                        raise
                    delay = min(delay * 2, self._max_backoff)
                    continue
                if paused:
                    log.warning("pipeline resumed: %s succeeded", what)
                return result
        finally:
            if paused:
                self._outages -= 1
                if self._outages == 0:
                    self.stats.paused_since = None
                    self.stats.pause_reason = ""

    async def _publish_counters(self, totals: list[DailyTotal]) -> None:
        if not totals:
            return
        try:
            await self._counters.publish(totals)
        except ServiceUnavailable as exc:
            self.stats.redis_failures += 1
            self._redis_failed_gen += 1
            log.warning("Redis counters not updated (%s); will rebuild from PostgreSQL", exc)

    # -- housekeeping (called from a timer) ---------------------------------

    async def reconcile(self) -> None:
        """Keep partitions ahead, drop expired ones, rebuild Redis if it lost its data.

        Housekeeping never stops the worker: a failure is logged and counted,
        and the next call tries again."""
        slot = await self._idle.get()
        try:
            await slot.writer()
            assert slot.conn is not None
            done = await maintain(slot.conn, months_ahead=self._ahead,
                                  retention_days=self._retention_days, drop=self._drop_expired)  # fmt: skip
            if done.dropped:
                for other in self._slots:
                    other.forget_partitions()
                log.info("dropped expired usage_logs partitions: %s", ", ".join(done.dropped))
            failed_gen = self._redis_failed_gen
            if failed_gen > self._redis_rebuilt_gen or not await self._counters.is_synced():
                # the pipeline's clock (a fixed one in tests) decides what "today" is
                today = (self._policy().now or datetime.now(UTC)).astimezone(UTC).date()
                n = await self._counters.rebuild(slot.conn, today=today)
                # Only failures seen before the rebuild began are repaired by it.
                self._redis_rebuilt_gen = max(self._redis_rebuilt_gen, failed_gen)
                self.stats.rebuilds += 1
                log.info("rebuilt %d Redis usage counters from PostgreSQL", n)
        except ServiceUnavailable as exc:  # Redis, or no PostgreSQL connection
            self.stats.reconcile_failures += 1
            log.warning("reconcile skipped: %s", exc)
        except Exception as exc:
            self.stats.reconcile_failures += 1
            slot.drop()  # whatever happened, the next run starts on a fresh connection
            if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError)) or (
                getattr(exc, "sqlstate", "") or ""
            ).startswith(("08", "57P")):
                log.warning("reconcile skipped: %s", describe(exc))
            else:
                log.exception("reconcile failed; trying again at the next interval")
        finally:
            self._idle.put_nowait(slot)
