"""Usage threshold notifications: a customer hears at 80 % and at 100 % of
their daily quota and of their monthly spend limit, once per threshold and
period, through the signed-webhook queue (:mod:`metering.alerts.webhooks`).

``usage_notices`` holds one row per notification (its primary key makes it
once), written in the same transaction as the webhook deliveries: a crash
either sends both or neither, and a restarted check finds nothing new.
Deliveries go to the operators' endpoints that take ``usage.threshold`` and
to the customer's own endpoints (``metering webhooks add URL --user ID``).

* **Daily quota**: requests served on a UTC day against the tier's
  ``daily_quota`` (what the edge enforces), checked for today and yesterday
  (a crossing just before midnight is still told).
* **Monthly spend**: the month's invoice as it stands (the base price,
  overage so far, adjustments) against ``users.monthly_spend_limit``, in the
  price's currency; priced with :meth:`Billing.preview`, so it is the same
  arithmetic as the invoice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from metering.billing.service import Billing
from metering.db.connect import connection
from metering.db.queries import get as q

EVENT = "usage.threshold"
THRESHOLDS = (80, 100)


def body(
    user_id: Any, email: str, kind: str, period: date, threshold: int, used: Any, limit: Any,
    currency: str | None,
) -> str:  # fmt: skip
    data = {
        "user_id": str(user_id),
        "email": email,
        "kind": kind,
        "period": period.isoformat() if kind == "daily_quota" else f"{period:%Y-%m}",
        "threshold_percent": threshold,
        "used": str(used),
        "limit": str(limit),
        "unit": currency if kind == "monthly_spend" else "requests",
    }
    message = {
        "type": EVENT,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(message, separators=(",", ":"))


def message_id(user_id: Any, kind: str, period: date, threshold: int) -> str:
    return f"msg_usage_{user_id}_{kind}_{period:%Y%m%d}_{threshold}"


class Notices:
    def __init__(self, db: asyncpg.Connection | asyncpg.Pool) -> None:
        self._db = db

    def _conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return connection(self._db)

    async def check_quotas(self, today: date | None = None) -> int:
        """Tell every user whose day crossed 80 % or 100 % of their quota; how many were told."""
        today = today or datetime.now(UTC).date()
        async with self._conn() as conn, conn.transaction():
            rows = await conn.fetch(q("notice_quota_crossings"), today - timedelta(days=1))
            for r in rows:
                await self._enqueue(conn, r["user_id"], r["email"], r["kind"], r["period"],
                                    r["threshold"], r["used"], r["limit_value"], None)  # fmt: skip
        return len(rows)

    async def check_spend(self, today: date | None = None) -> int:
        """Tell every user whose month so far crossed 80 % or 100 % of their spend limit."""
        month = (today or datetime.now(UTC).date()).replace(day=1)
        sent = 0
        async with self._conn() as conn:
            users = await conn.fetch(q("notice_spend_users"), month)
            if not users:
                return 0
            limits = {r["id"]: r for r in users}
            drafts = await Billing(conn).preview(month, list(limits))
            for d in drafts:
                spend = d.subtotal + d.adjusted
                user = limits[d.user_id]
                crossed = self._crossed(spend, user["monthly_spend_limit"])
                if not crossed:
                    continue
                async with conn.transaction():
                    for pct in crossed:
                        new = await conn.fetchval(
                            q("notice_insert"), d.user_id, "monthly_spend", month, pct, spend,
                            user["monthly_spend_limit"], d.currency,
                        )  # fmt: skip
                        if new is not None:
                            sent += 1
                            await self._enqueue(conn, d.user_id, user["email"], "monthly_spend",
                                                month, pct, spend, user["monthly_spend_limit"],
                                                d.currency)  # fmt: skip
        return sent

    @staticmethod
    def _crossed(used: Decimal, limit: Decimal) -> Iterable[int]:
        return [pct for pct in THRESHOLDS if used * 100 >= limit * pct]

    async def _enqueue(
        self, conn: asyncpg.Connection, user_id: Any, email: str, kind: str, period: date,
        threshold: int, used: Any, limit: Any, currency: str | None,
    ) -> None:  # fmt: skip
        await conn.execute(
            q("enqueue_user_webhooks"),
            message_id(user_id, kind, period, threshold),
            EVENT,
            body(user_id, email, kind, period, threshold, used, limit, currency),
            user_id,
        )

    async def set_spend_limit(self, user_id: Any, limit: Decimal | None) -> None:
        async with self._conn() as conn:
            await conn.fetchval(q("set_spend_limit"), user_id, limit)

    async def recent(self, user_id: Any = None, limit: int = 50) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(q("list_notices"), user_id, limit))
