"""``metering usage rebuild``: a month's daily tables recomputed from its raw
partition, compared with what is stored and what was billed, and written
only when asked.

The recomputation uses the pipeline's own formulas (``rebuild.sql`` mirrors
``insert_and_aggregate``), into session temp tables, in one transaction.
Without ``apply`` nothing changes. With it, the pipeline's writes to the
daily tables wait on a table lock while the month's rows are replaced, so
no batch commits between the recomputation and the replacement (a batch
that waits longer than its statement timeout is retried, as in any
outage). A final month's invoices do not change: the difference in
billable units becomes an adjustment on the next invoice
(:mod:`metering.billing.service`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import asyncpg

from metering.billing.drafts import next_month
from metering.db.queries import get as q
from metering.errors import InputError


@dataclass(slots=True)
class RebuildResult:
    month: date
    raw_rows: int = 0
    daily_rows: int = 0
    daily_diffs: list[asyncpg.Record] = field(default_factory=list)
    endpoint_diffs: int = 0
    histogram_diffs: int = 0
    billed: list[asyncpg.Record] = field(default_factory=list)
    applied: bool = False

    @property
    def clean(self) -> bool:
        return not self.daily_diffs and not self.endpoint_diffs


class Rebuild:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def run(self, month: date, *, apply: bool) -> RebuildResult:
        first = month.replace(day=1)
        after = next_month(first)
        start = datetime.combine(first, datetime.min.time(), UTC)
        end = datetime.combine(after, datetime.min.time(), UTC)
        conn = self._conn
        result = RebuildResult(first)
        async with conn.transaction():
            partition = await conn.fetchval(
                "SELECT to_regclass(quote_ident(usage_logs_partition_name($1)))::text", start
            )
            if partition is None:
                raise InputError(
                    f"the raw events of {first:%Y-%m} are not kept (no partition "
                    f"usage_logs_y{first:%Y}m{first:%m}); there is nothing to rebuild from"
                )
            if apply:
                await conn.execute(q("rebuild_lock"))
            await conn.execute(q("rebuild_create_daily"))
            await conn.execute(q("rebuild_create_endpoint"))
            await conn.execute(q("rebuild_daily"), start, end)
            await conn.execute(q("rebuild_endpoint"), start, end)
            result.raw_rows = await conn.fetchval(
                "SELECT count(*) FROM usage_logs WHERE created_at >= $1 AND created_at < $2",
                start,
                end,
            )
            result.daily_rows = await conn.fetchval("SELECT count(*) FROM rebuilt_daily")
            result.daily_diffs = list(await conn.fetch(q("rebuild_diff_daily"), first, after))
            ep = await conn.fetchrow(q("rebuild_diff_endpoint"), first, after)
            assert ep is not None
            result.endpoint_diffs, result.histogram_diffs = ep["rows"], ep["histograms"]
            result.billed = list(await conn.fetch(q("rebuild_billed"), first, after))
            if apply and not result.clean:
                await conn.execute(q("rebuild_delete_daily"), first, after)
                await conn.execute(q("rebuild_insert_daily"))
                await conn.execute(q("rebuild_delete_endpoint"), first, after)
                await conn.execute(q("rebuild_insert_endpoint"))
                result.applied = True
        return result
