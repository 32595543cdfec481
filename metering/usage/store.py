"""Writing usage into PostgreSQL: one transaction per batch, idempotent.

For a batch the writer:

1. makes sure every month the batch touches has a ``usage_logs`` partition;
2. binary-COPYs the rows into a session temp table (``usage_stage``);
3. runs ONE statement that inserts them into ``usage_logs`` with
   ``ON CONFLICT DO NOTHING`` and feeds only the rows actually inserted,
   aggregated per (user, UTC day), into the ``daily_usage`` upsert,
   returning the new daily totals;
4. commits.

A redelivered event hits the (event_id, created_at) key, is not inserted and
adds nothing, so replays are harmless; the returned totals are committed
truth that Redis can be set to. They cover every (user, day) the batch
touched, also those whose events were all duplicates: a batch retried after
its COMMIT's acknowledgement was lost inserts nothing, and Redis must still
learn the totals that commit produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from metering.db.connect import RowDataError, connect
from metering.db.partitions import month_partition
from metering.db.queries import get
from metering.events import UsageEvent
from metering.usage.counters import DailyTotal

STAGE_COLUMNS = (
    "event_id",
    "created_at",
    "user_id",
    "api_key_id",
    "endpoint",
    "method",
    "status_code",
    "response_time_ms",
    "client_ip",
    "bytes_out",
    "units",
    "schema_version",
    "rejected",
    "request_count",
)

CREATE_STAGE = get("create_usage_stage")

INSERT_AND_AGGREGATE = get("insert_and_aggregate")


TOTALS_OF = get("totals_of")
ENSURE_MONTH_PARTITION = get("ensure_month_partition")


@dataclass(frozen=True, slots=True)
class WriteResult:
    received: int
    inserted: int  # new rows in usage_logs; received - inserted were duplicates
    totals: list[DailyTotal]  # committed daily totals of every (user, day) touched

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


def to_row(e: UsageEvent) -> tuple[object, ...]:
    return (
        e.event_id,
        e.occurred_at,
        e.user_id,
        e.api_key_id,
        e.endpoint,
        e.method,
        e.status_code,
        e.response_time_ms,
        e.client_ip,
        e.bytes_out,
        e.units,
        e.schema_version,
        e.rejected,
        e.count,
    )


class UsageWriter:
    """Writes batches over one dedicated connection (the temp table lives on it)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._known_months: set[tuple[int, int]] = set()  # (year, month), UTC
        self._stage_ready = False

    def forget_partitions(self) -> None:
        """Re-check partitions on the next write (after maintenance dropped some)."""
        self._known_months.clear()

    async def write(self, events: Sequence[UsageEvent]) -> WriteResult:
        if not events:
            return WriteResult(0, 0, [])
        conn = self._conn
        await self._ensure_partitions(events)
        if not self._stage_ready:
            await conn.execute(CREATE_STAGE)
            self._stage_ready = True
        async with conn.transaction():
            try:
                await conn.copy_records_to_table(
                    "usage_stage", records=[to_row(e) for e in events], columns=STAGE_COLUMNS
                )
            except (TypeError, ValueError, OverflowError) as exc:
                # asyncpg encodes COPY rows client side and raises these bare
                raise RowDataError(f"a value could not be encoded: {exc}") from exc
            row = await conn.fetchrow(INSERT_AND_AGGREGATE)
            assert row is not None
            totals = [
                DailyTotal(*fields)
                for fields in zip(
                    row["user_ids"],
                    row["dates"],
                    row["requests"],
                    row["units"],
                    row["errors"],
                    row["throttled"],
                    row["rejected"],
                    strict=True,
                )
            ]
            if row["inserted"] < len(events):  # duplicates: some user-days may be untouched
                totals += await self._unchanged_totals(events, totals)
        return WriteResult(len(events), row["inserted"], totals)

    async def _unchanged_totals(
        self, events: Sequence[UsageEvent], changed: list[DailyTotal]
    ) -> list[DailyTotal]:
        seen = {(t.user_id, t.day) for t in changed}
        wanted = {
            (e.user_id, e.occurred_at.date())
            for e in events
            if e.user_id is not None and (e.user_id, e.occurred_at.date()) not in seen
        }
        if not wanted:
            return []
        users, days = zip(*wanted, strict=True)
        rows = await self._conn.fetch(TOTALS_OF, list(users), list(days))
        return [DailyTotal(*r) for r in rows]

    async def _ensure_partitions(self, events: Sequence[UsageEvent]) -> None:
        months = {(e.occurred_at.year, e.occurred_at.month): e.occurred_at for e in events}
        for month, ts in months.items():
            if month in self._known_months:
                continue
            await self._conn.execute(ENSURE_MONTH_PARTITION, month_partition(ts).start)
            self._known_months.add(month)


class WriterConnection:
    """One PostgreSQL connection and its writer (the writer's temp table lives on it)."""

    def __init__(self, dsn: str, command_timeout: float) -> None:
        self._dsn = dsn
        self._command_timeout = command_timeout
        self.conn: asyncpg.Connection | None = None
        self._writer: UsageWriter | None = None

    async def writer(self) -> UsageWriter:
        if self._writer is None or self.conn is None or self.conn.is_closed():
            self.conn = await connect(
                self._dsn,
                timeout=min(10.0, self._command_timeout),
                command_timeout=self._command_timeout,
            )
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
            try:
                await conn.close(timeout=5)  # a silent server must not hold up shutdown
            except Exception:
                conn.terminate()
