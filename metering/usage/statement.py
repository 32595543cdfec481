"""``metering report``: a customer's month as a statement, a chart and a CSV,
and the month's top consumers for operators.

Every figure comes from ``daily_usage`` (requests, refusals, errors, units)
and ``daily_endpoint_usage`` (each day's latency percentiles, merged over
the customer's keys and endpoints), so a report works for months whose raw
events are gone. The PNG (matplotlib, drawn off-screen) carries the figures
it plots as JSON in its ``Description`` text chunk, so a reader can check
them against the database.
"""

from __future__ import annotations

import csv
import json
import uuid
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from metering.billing.drafts import next_month
from metering.db.queries import get as q
from metering.errors import InputError


@dataclass(frozen=True, slots=True)
class Day:
    date: date
    served: int
    refused: int
    units: int
    client_errors: int
    server_errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class Statement:
    user_id: uuid.UUID
    email: str
    tier: str
    month: date
    days: list[Day]
    invoice: asyncpg.Record | None

    @property
    def served(self) -> int:
        return sum(d.served for d in self.days)

    @property
    def refused(self) -> int:
        return sum(d.refused for d in self.days)

    @property
    def units(self) -> int:
        return sum(d.units for d in self.days)

    @property
    def errors(self) -> int:
        return sum(d.client_errors + d.server_errors for d in self.days)


async def statement(conn: asyncpg.Connection, user: Any, month: date) -> Statement:
    from metering.accounts import store

    u = await store.get_user(conn, user)
    first = month.replace(day=1)
    rows = await conn.fetch(q("statement_days"), u.id, first, next_month(first))
    days = [
        Day(r["date"], int(r["served"]), int(r["refused"]), int(r["units"]),
            int(r["client_errors"]), int(r["server_errors"]), r["p50"], r["p95"], r["p99"])
        for r in rows
    ]  # fmt: skip
    invoice = await conn.fetchrow(q("statement_invoice"), u.id, first)
    return Statement(u.id, u.email, u.tier, first, days, invoice)


async def top(conn: asyncpg.Connection, month: date, n: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("report_top"), month.replace(day=1), n))


def write_csv(s: Statement, path: str | Path) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([
            "date", "served", "refused", "units", "client_errors", "server_errors",
            "p50_ms", "p95_ms", "p99_ms",
        ])  # fmt: skip
        for d in s.days:
            out.writerow([
                d.date.isoformat(), d.served, d.refused, d.units, d.client_errors,
                d.server_errors, *(ms_text(v) for v in (d.p50_ms, d.p95_ms, d.p99_ms)),
            ])  # fmt: skip


def ms_text(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_png(s: Statement, path: str | Path) -> None:
    """Daily requests (served, refused) and errors above, latency percentiles below."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.dates import DateFormatter, DayLocator
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("charts need matplotlib: pip install 'metering[reports]'") from None
    if not s.days:
        raise InputError(f"{s.email} has no usage in {s.month:%Y-%m}: nothing to chart")
    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top_ax, low_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    x = [d.date for d in s.days]
    served = [d.served for d in s.days]
    top_ax.bar(x, served, color="#3b6fd8", label="served")
    top_ax.bar(x, [d.refused for d in s.days], bottom=served, color="#f0a63a", label="refused")
    top_ax.plot(x, [d.client_errors + d.server_errors for d in s.days], color="#c0392b",
                marker="o", linewidth=1.5, label="errors (4xx + 5xx)")  # fmt: skip
    top_ax.set_ylabel("requests per day")
    top_ax.legend(loc="upper left", ncols=3, framealpha=0.9)
    top_ax.set_title(f"{s.email} ({s.tier}), {s.month:%B %Y}, UTC days")
    for label, attr, style in (
        ("p50", "p50_ms", "-"),
        ("p95", "p95_ms", "--"),
        ("p99", "p99_ms", ":"),
    ):
        low_ax.plot(x, [getattr(d, attr) for d in s.days], style, marker=".", label=label)
    low_ax.set_ylabel("latency, ms (served)")
    low_ax.legend(loc="upper left", ncols=3, framealpha=0.9)
    # the whole month, a tick per day, whatever days have usage
    first, last = s.month, next_month(s.month) - timedelta(days=1)
    low_ax.set_xlim(first - timedelta(hours=14), last + timedelta(hours=14))
    low_ax.xaxis.set_major_locator(DayLocator(interval=2))
    low_ax.xaxis.set_major_formatter(DateFormatter("%d"))
    low_ax.set_xlabel(f"day of {s.month:%B %Y}")
    figures = {"user_id": str(s.user_id), "month": f"{s.month:%Y-%m}",
               "days": [asdict(d) | {"date": d.date.isoformat()} for d in s.days]}  # fmt: skip
    fig.savefig(
        Path(path),
        format="png",
        metadata={
            "Title": f"metering report {s.email} {s.month:%Y-%m}",
            "Description": json.dumps(figures),
        },
    )
