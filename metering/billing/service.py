"""The billing service: bill a month, finalize it, read invoices, set prices.

``bill`` computes one draft invoice per user and stores it; running it again
gives the same invoices (and writes nothing when nothing changed) until the
month is final. ``finalize`` bills the month once more and freezes it in
the same transaction: months finalize in order, a final month is never
billed again, and the database refuses any change to a final invoice
(migration 0012). Usage of a final month recorded later becomes an
adjustment line on the next month's invoice. All runs take one advisory
lock, so two at once (an operator and a worker's timer) cannot interleave.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from metering.billing.drafts import (
    Adjustment,
    Draft,
    adjustment,
    draft,
    final_periods,
    next_month,
    price_book,
    timeline,
)
from metering.billing.pricing import Price, month_days
from metering.db.connect import connection
from metering.db.queries import get as q
from metering.errors import InputError


@dataclass(slots=True)
class BillRun:
    month: date
    invoices: int = 0
    changed: int = 0
    removed: int = 0
    adjustments: int = 0
    finalized: int = 0
    totals: dict[str, Decimal] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # users that could not be billed


def today_utc() -> date:
    return datetime.now(UTC).date()


class Billing:
    def __init__(self, db: asyncpg.Connection | asyncpg.Pool) -> None:
        self._db = db

    def _conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return connection(self._db)

    # -- billing -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _run(self) -> AsyncIterator[asyncpg.Connection]:
        """One billing run at a time (a session lock, taken before the snapshot),
        reading one snapshot (REPEATABLE READ): the units an adjustment counts
        and the usage it prices come from the same moment."""
        async with self._conn() as conn:
            await conn.execute(q("billing_lock"))
            try:
                async with conn.transaction(isolation="repeatable_read"):
                    yield conn
            finally:
                if not conn.is_closed():  # a lost session has released its lock already
                    with contextlib.suppress(asyncpg.PostgresError, OSError):
                        await conn.execute(q("billing_unlock"))

    async def _after_final(
        self, conn: asyncpg.Connection, first: date, *, is_final: str, before: str
    ) -> date | None:
        """Refuse a month at or before the last final one; that month, or None."""
        latest: date | None = await conn.fetchval(q("billing_latest_final"))
        if latest is not None and first <= latest:
            if await conn.fetchval(q("billing_month_status"), first) == "final":
                raise InputError(f"{first:%Y-%m} {is_final}")
            raise InputError(f"{first:%Y-%m} comes before {latest:%Y-%m}, which is final{before}")
        return latest

    async def bill(
        self, month: date, *, users: Sequence[uuid.UUID] | None = None, today: date | None = None
    ) -> BillRun:
        """Draft invoices for ``month`` (all users, or ``users``). Users that
        cannot be billed (a price missing, two currencies) are reported in
        ``errors``; the others are billed."""
        first, _ = month_days(month)
        if first > (today or today_utc()):
            raise InputError(f"{first:%Y-%m} has not begun")
        async with self._run() as conn:
            await self._after_final(
                conn,
                first,
                is_final="is final; usage recorded for it since then goes on the next invoice "
                "as an adjustment",
                before=": months are billed in order",
            )
            run = await self._compute(conn, first, list(users) if users is not None else None)
            await conn.execute(q("billing_month_billed"), first)
            return run

    async def finalize(self, month: date, *, by: str, today: date | None = None) -> BillRun:
        """Bill ``month`` once more and make every invoice of it final. Months
        finalize in order, with no gap after the last final one."""
        first, last = month_days(month)
        if last >= (today or today_utc()):
            raise InputError(f"{first:%Y-%m} has not ended (its last day is {last})")
        async with self._run() as conn:
            latest = await self._after_final(conn, first, is_final="is already final", before="")
            if latest is not None and first != next_month(latest):
                raise InputError(
                    f"finalize {next_month(latest):%Y-%m} first: months finalize in order"
                )
            earlier = await conn.fetchval(q("billing_month_draft_before"), first)
            if earlier is not None:
                raise InputError(f"finalize {earlier:%Y-%m} first: months finalize in order")
            run = await self._compute(conn, first, None)
            if run.errors:
                raise InputError(
                    f"{first:%Y-%m} not finalized: {len(run.errors)} user(s) cannot be billed: "
                    + "; ".join(run.errors[:5])
                )
            status = await conn.execute(q("billing_finalize_invoices"), first, by)
            run.finalized = int(status.split()[-1])
            await conn.execute(q("billing_month_finalize"), first, by)
            return run

    async def due_months(self, *, grace: timedelta, now: datetime | None = None) -> list[date]:
        """Months past their grace period, not final, oldest first: from the one after the
        last final month (or the oldest billed draft, or last month) to last month."""
        now = now or datetime.now(UTC)
        this_month = now.date().replace(day=1)
        last_month = (this_month - timedelta(days=1)).replace(day=1)
        async with self._conn() as conn:
            latest = await conn.fetchval(q("billing_latest_final"))
            oldest_draft = await conn.fetchval(q("billing_month_draft_before"), this_month)
        month = next_month(latest) if latest else min(oldest_draft or last_month, last_month)
        due = []
        while month <= last_month:
            if now < datetime.combine(next_month(month), datetime.min.time(), UTC) + grace:
                break
            due.append(month)
            month = next_month(month)
        return due

    async def finalize_due(
        self, *, grace: timedelta, by: str, now: datetime | None = None
    ) -> list[BillRun]:
        """What the workers have done for them: finalize the due months, in order."""
        now = now or datetime.now(UTC)
        return [
            await self.finalize(month, by=by, today=now.date())
            for month in await self.due_months(grace=grace, now=now)
        ]

    async def preview(self, month: date, users: Sequence[uuid.UUID]) -> list[Draft]:
        """The month's invoices of ``users`` as they stand, without storing them
        (what a spend notification compares with its limit)."""
        first, _ = month_days(month)
        async with self._conn() as conn:  # a customer who cannot be priced is left out
            return await self._drafts(conn, first, list(users), errors=[])

    async def _compute(
        self, conn: asyncpg.Connection, first: date, users: list[uuid.UUID] | None
    ) -> BillRun:
        run = BillRun(first)
        drafts = await self._drafts(conn, first, users, run.errors)
        await self._store(conn, first, drafts, run, prune=users is None)
        return run

    async def _drafts(
        self,
        conn: asyncpg.Connection,
        first: date,
        users: list[uuid.UUID] | None,
        errors: list[str] | None = None,
    ) -> list[Draft]:
        """The month's drafts; a user that cannot be billed goes to ``errors``
        (or raises, without a list)."""
        _, last = month_days(first)
        book = price_book(await conn.fetch(q("billing_prices")))
        by_id = {p.id: p for versions in book.values() for _, p in versions if p.id is not None}
        billed = await conn.fetch(q("billing_users"), first, last, users)
        history: dict[uuid.UUID, list[tuple[date, int, str]]] = {}
        for r in await conn.fetch(q("billing_history"), first, last, users):
            history.setdefault(r["user_id"], []).append(
                (r["effective_from"], r["tier_id"], r["tier"])
            )
        usage: dict[uuid.UUID, list[tuple[date, int, int]]] = {}
        for r in await conn.fetch(q("billing_usage"), first, last, users):
            usage.setdefault(r["user_id"], []).append(
                (r["date"], int(r["requests"]), int(r["units"]))
            )
        adjustments, late_currencies = await self._adjustments(conn, first, users, by_id)

        drafts: list[Draft] = []
        billed_ids = {r["id"] for r in billed}
        for user_id in sorted(billed_ids | set(adjustments)):
            try:
                # a user no longer billed (deleted) still gets the corrections of earlier months
                entries = timeline(history.get(user_id, []), book) if user_id in billed_ids else []
                d = draft(
                    user_id,
                    first,
                    entries,
                    usage.get(user_id, []) if user_id in billed_ids else [],
                    adjustments.get(user_id, []),
                    late_currencies.get(user_id, set()),
                )
            except InputError as exc:
                if errors is None:
                    raise
                errors.append(str(exc) if str(user_id) in str(exc) else f"user {user_id}: {exc}")
                continue
            if d is not None:
                drafts.append(d)
        return drafts

    async def _adjustments(
        self,
        conn: asyncpg.Connection,
        first: date,
        users: list[uuid.UUID] | None,
        prices: Mapping[int, Price],
    ) -> tuple[dict[uuid.UUID, list[Adjustment]], dict[uuid.UUID, set[str]]]:
        late = await conn.fetch(q("billing_late"), first, users)
        if not late:
            return {}, {}
        parts: dict[int, list[Any]] = {}
        for r in await conn.fetch(q("billing_periods_of"), [r["id"] for r in late]):
            parts.setdefault(r["invoice_id"], []).append(r)
        units: dict[tuple[uuid.UUID, date], dict[date, int]] = {}
        rows = await conn.fetch(
            q("billing_usage_of"), [r["user_id"] for r in late], [r["month"] for r in late]
        )
        for r in rows:
            units.setdefault((r["user_id"], r["month"]), {})[r["date"]] = int(r["units"])
        out: dict[uuid.UUID, list[Adjustment]] = {}
        currency: dict[uuid.UUID, set[str]] = {}
        for r in late:
            periods = final_periods(parts.get(r["id"], []), prices)
            out.setdefault(r["user_id"], []).append(
                adjustment(r, periods, units.get((r["user_id"], r["month"]), {}))
            )
            currency.setdefault(r["user_id"], set()).add(r["currency"])
        return out, currency

    async def _store(
        self,
        conn: asyncpg.Connection,
        month: date,
        drafts: list[Draft],
        run: BillRun,
        *,
        prune: bool,
    ) -> None:
        existing = {r["user_id"]: r for r in await conn.fetch(q("billing_existing"), month)}
        changed = [
            d
            for d in drafts
            if d.user_id not in existing or existing[d.user_id]["content_hash"] != d.content_hash
        ]
        run.invoices = len(drafts)
        run.changed = len(changed)
        run.adjustments = sum(len(d.adjustments) for d in drafts)
        for d in drafts:
            run.totals[d.currency] = (
                run.totals.get(d.currency, Decimal("0.00")) + d.subtotal + d.adjusted
            )
        if prune:
            status = await conn.execute(
                q("billing_drop_drafts"), month, [d.user_id for d in drafts]
            )
            run.removed = int(status.split()[-1])
        if not changed:
            return
        rows = await conn.fetch(
            q("billing_upsert_invoices"),
            month,
            [d.user_id for d in changed],
            [d.currency for d in changed],
            [d.subtotal for d in changed],
            [d.adjusted for d in changed],
            [d.units for d in changed],
            [d.requests for d in changed],
            [d.content_hash for d in changed],
        )
        invoice_of = {r["user_id"]: r["id"] for r in rows}
        ids = list(invoice_of.values())
        await conn.execute(q("billing_clear_lines"), ids)
        await conn.execute(q("billing_clear_usage"), ids)
        lines: list[tuple[Any, ...]] = []
        days: list[tuple[Any, ...]] = []
        for d in changed:
            inv = invoice_of[d.user_id]
            n = 0
            for n, (ln, price_id) in enumerate(d.lines, start=1):
                lines.append(
                    (inv, n, ln.kind, ln.tier, ln.description, ln.quantity, ln.unit_price,
                     ln.amount, ln.first_day, ln.last_day, price_id, None, None, None)
                )  # fmt: skip
            for m, a in enumerate(d.adjustments, start=n + 1):
                ln = a.line
                lines.append(
                    (inv, m, ln.kind, ln.tier or None, ln.description, ln.quantity, None,
                     ln.amount, ln.first_day, ln.last_day, None, a.refers_to, a.refers_to_month,
                     a.units_delta)
                )  # fmt: skip
            days.extend((inv, day, r, u) for day, r, u in d.usage)
        await conn.copy_records_to_table(
            "invoice_lines",
            records=lines,
            columns=[
                "invoice_id", "line_no", "kind", "tier", "description", "quantity", "unit_price",
                "amount", "first_day", "last_day", "price_id", "refers_to", "refers_to_month",
                "units_delta",
            ],
        )  # fmt: skip
        await conn.copy_records_to_table(
            "invoice_usage", records=days, columns=["invoice_id", "date", "requests", "units"]
        )

    # -- reading -------------------------------------------------------------

    async def invoices(
        self,
        *,
        month: date | None = None,
        user: uuid.UUID | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(q("list_invoices"), month, user, status, limit))

    async def get(
        self, ref: str
    ) -> tuple[asyncpg.Record, list[asyncpg.Record], list[asyncpg.Record]]:
        """An invoice by id or number, with its lines and its usage per day."""
        invoice_id = int(ref) if ref.isdigit() else None
        async with self._conn() as conn:
            inv = await conn.fetchrow(q("invoice_by_ref"), invoice_id, ref)
            if inv is None:
                raise InputError(f"no invoice {ref!r}")
            lines = await conn.fetch(q("invoice_lines_of"), inv["id"])
            days = await conn.fetch(q("invoice_usage_of"), inv["id"])
        return inv, list(lines), list(days)

    # -- prices --------------------------------------------------------------

    async def price_rows(self, tier: str) -> list[asyncpg.Record]:
        """A tier's price versions, newest first, each with how many invoices used it."""
        async with self._conn() as conn:
            rows = await conn.fetch(q("tier_prices_of"), tier)
            if not rows and await conn.fetchval(q("tier_id"), tier) is None:
                raise InputError(f"no tier {tier!r}")
            return list(rows)

    async def set_price(self, tier: str, price: Price, *, since: date) -> int:
        """A new price version of ``tier`` from day ``since``. A version of the
        same day is replaced if no invoice used it; a day inside a final month is refused."""
        async with self._run() as conn:
            tier_id = await conn.fetchval(q("tier_id"), tier)
            if tier_id is None:
                raise InputError(f"no tier {tier!r}")
            final = await conn.fetchval(q("billing_final_month_from"), since.replace(day=1))
            if final is not None:
                raise InputError(
                    f"{final:%Y-%m} is final: a price can change from {next_month(final)} on"
                )
            same = await conn.fetchrow(q("tier_price_at"), tier_id, since)
            if same is not None:
                if same["used"]:
                    raise InputError(
                        f"tier {tier}'s price from {since} is on invoices; choose another day"
                    )
                await conn.execute(q("tier_price_delete"), same["id"])
            price_id = await conn.fetchval(
                q("tier_price_insert"), tier_id, since, price.currency, price.base_monthly,
                price.included_units,
            )  # fmt: skip
            await conn.execute(
                q("tier_price_bands_insert"),
                price_id,
                [b.from_units for b in price.bands],
                [b.per_1000 for b in price.bands],
            )
            await conn.execute(q("tier_price_sync"), tier_id)
            return int(price_id)
