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

from metering.db.connect import RowDataError
from metering.db.partitions import month_partition
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
)

CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS usage_stage (
    event_id uuid, created_at timestamptz, user_id uuid, api_key_id uuid,
    endpoint text, method text, status_code smallint, response_time_ms double precision,
    client_ip text, bytes_out bigint, units integer, schema_version smallint
) ON COMMIT DELETE ROWS
"""

# Data-modifying CTEs: all run once, in one snapshot, in one statement.
# Aggregates are ordered so concurrent writers lock daily_usage rows in the
# same order (no deadlocks during a rebalance overlap).
INSERT_AND_AGGREGATE = """
WITH inserted AS (
    INSERT INTO usage_logs (event_id, created_at, user_id, api_key_id, endpoint, method,
                            status_code, response_time_ms, client_ip, bytes_out, units,
                            schema_version)
    SELECT event_id, created_at, user_id, api_key_id, endpoint, method,
           status_code, response_time_ms, client_ip::inet, bytes_out, units, schema_version
    FROM usage_stage
    ON CONFLICT DO NOTHING
    RETURNING user_id, created_at, status_code, response_time_ms, bytes_out, units
), per_day AS (
    SELECT user_id,
           (created_at AT TIME ZONE 'UTC')::date AS date,
           count(*) AS request_count,
           sum(units) AS units,
           count(*) FILTER (WHERE status_code BETWEEN 400 AND 499) AS client_errors,
           count(*) FILTER (WHERE status_code >= 500) AS server_errors,
           count(*) FILTER (WHERE status_code = 429) AS throttled,
           sum(response_time_ms) AS response_time_ms,
           coalesce(sum(bytes_out), 0) AS bytes_out
    FROM inserted
    WHERE user_id IS NOT NULL
    GROUP BY 1, 2
    ORDER BY 1, 2
), upserted AS (
    INSERT INTO daily_usage AS d (user_id, date, request_count, units, client_error_count,
                                  server_error_count, throttled_count, total_response_time_ms,
                                  bytes_out)
    SELECT user_id, date, request_count, units, client_errors, server_errors, throttled,
           response_time_ms, bytes_out
    FROM per_day
    ON CONFLICT (user_id, date) DO UPDATE SET
        request_count          = d.request_count + EXCLUDED.request_count,
        units                  = d.units + EXCLUDED.units,
        client_error_count     = d.client_error_count + EXCLUDED.client_error_count,
        server_error_count     = d.server_error_count + EXCLUDED.server_error_count,
        throttled_count        = d.throttled_count + EXCLUDED.throttled_count,
        total_response_time_ms = d.total_response_time_ms + EXCLUDED.total_response_time_ms,
        bytes_out              = d.bytes_out + EXCLUDED.bytes_out,
        updated_at             = now()
    RETURNING d.user_id, d.date, d.request_count, d.units,
              d.client_error_count + d.server_error_count AS errors, d.throttled_count AS throttled
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       coalesce((SELECT array_agg(u.user_id) FROM upserted u), '{}') AS user_ids,
       coalesce((SELECT array_agg(u.date) FROM upserted u), '{}') AS dates,
       coalesce((SELECT array_agg(u.request_count) FROM upserted u), '{}') AS requests,
       coalesce((SELECT array_agg(u.units) FROM upserted u), '{}') AS units,
       coalesce((SELECT array_agg(u.errors) FROM upserted u), '{}') AS errors,
       coalesce((SELECT array_agg(u.throttled) FROM upserted u), '{}') AS throttled
"""


# Totals of (user, day) pairs the batch touched but did not change (all its
# events there were duplicates).
TOTALS_OF = """
SELECT d.user_id, d.date, d.request_count, d.units,
       d.client_error_count + d.server_error_count AS errors, d.throttled_count AS throttled
FROM unnest($1::uuid[], $2::date[]) AS t(user_id, date)
JOIN daily_usage d ON d.user_id = t.user_id AND d.date = t.date
"""


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
                DailyTotal(u, d, r, n, x, t)
                for u, d, r, n, x, t in zip(
                    row["user_ids"],
                    row["dates"],
                    row["requests"],
                    row["units"],
                    row["errors"],
                    row["throttled"],
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
        return [DailyTotal(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def _ensure_partitions(self, events: Sequence[UsageEvent]) -> None:
        months = {(e.occurred_at.year, e.occurred_at.month): e.occurred_at for e in events}
        for month, ts in months.items():
            if month in self._known_months:
                continue
            await self._conn.execute(
                "SELECT ensure_usage_logs_partition($1)", month_partition(ts).start
            )
            self._known_months.add(month)
