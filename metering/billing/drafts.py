"""From what the database holds to the lines of a month's invoices (no I/O).

:func:`timeline` merges a user's tier history with the tiers' price versions;
:func:`draft` prices a month with :mod:`metering.billing.pricing`;
:func:`adjustment` prices the usage of a final month that arrived after it
was final, as one line of a later invoice.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from metering.billing.pricing import (
    Band,
    Line,
    Period,
    Price,
    invoice_lines,
    month_days,
    periods,
    total,
)
from metering.errors import InputError


@dataclass(frozen=True, slots=True)
class Adjustment:
    line: Line
    refers_to: int  # the final invoice it corrects
    refers_to_month: date
    units_delta: int


@dataclass(slots=True)
class Draft:
    user_id: uuid.UUID
    currency: str
    lines: list[tuple[Line, int | None]]  # with the price version of each
    adjustments: list[Adjustment]
    usage: list[tuple[date, int, int]]  # day, requests, units
    units: int = 0
    requests: int = 0
    content_hash: str = field(default="")

    @property
    def subtotal(self) -> Decimal:
        return total([line for line, _ in self.lines])

    @property
    def adjusted(self) -> Decimal:
        return sum((a.line.amount for a in self.adjustments), Decimal("0.00"))

    def seal(self) -> Draft:
        """Fill the totals and the hash of everything the invoice shows."""
        self.units = sum(u for _, _, u in self.usage)
        self.requests = sum(r for _, r, _ in self.usage)
        text = repr(
            (
                self.currency,
                [(ln, pid) for ln, pid in self.lines],
                [(a.line, a.refers_to, a.units_delta) for a in self.adjustments],
                self.usage,
            )
        )
        self.content_hash = hashlib.sha256(text.encode()).hexdigest()
        return self


def price_of(row: Any) -> Price:
    bands = tuple(
        Band(int(f), Decimal(p)) for f, p in zip(row["band_from"], row["band_price"], strict=True)
    )
    return Price(
        row["currency"], row["base_monthly"], int(row["included_units"]), bands, id=row["id"]
    )


def price_book(rows: Sequence[Any]) -> dict[int, list[tuple[date, Price]]]:
    """tier id -> its versions, oldest first."""
    book: dict[int, list[tuple[date, Price]]] = {}
    for r in rows:
        book.setdefault(r["tier_id"], []).append((r["effective_from"], price_of(r)))
    return book


def timeline(
    history: Sequence[tuple[date, int, str]], book: Mapping[int, Sequence[tuple[date, Price]]]
) -> list[tuple[date, str, Price]]:
    """(day, tier, price) from the user's tier entries (day, tier id, name),
    split again wherever the tier's price changed."""
    out: list[tuple[date, str, Price]] = []
    for i, (since, tier_id, name) in enumerate(history):
        until = history[i + 1][0] if i + 1 < len(history) else date.max
        versions = book.get(tier_id, [])
        current = [p for day, p in versions if day <= since]
        if not current:
            raise InputError(f"tier {name} has no price in effect on {since}")
        out.append((since, name, current[-1]))
        out.extend((day, name, p) for day, p in versions if since < day < until)
    return out


def draft(
    user_id: uuid.UUID,
    month: date,
    entries: Sequence[tuple[date, str, Price]],
    usage: Sequence[tuple[date, int, int]],
    adjustments: Sequence[Adjustment],
    late_currencies: set[str] | None = None,
) -> Draft | None:
    """The month's invoice for one user, or None when they owe nothing to show
    (no tier in the month and no adjustment)."""
    parts = periods(month, entries)
    units = {day: u for day, _, u in usage}
    lines = invoice_lines(month, parts, units)
    currencies = {p.price.currency for p in parts} | (late_currencies or set())
    if not parts and not adjustments:
        return None
    if len(currencies) != 1:
        raise InputError(
            f"user {user_id}: prices in {', '.join(sorted(currencies))} in one month; "
            "an invoice has one currency"
        )
    price_ids = {(p.first_day, p.tier): p.price.id for p in parts}
    first, last = month_days(month)
    kept = sorted((d, r, u) for d, r, u in usage if first <= d <= last)
    return Draft(
        user_id,
        currencies.pop(),
        [(ln, price_ids.get((ln.first_day, ln.tier))) for ln in lines],
        list(adjustments),
        kept,
    ).seal()


def final_periods(rows: Sequence[Any], book: Mapping[int, Price]) -> list[Period]:
    """A final invoice's periods, from its base lines and the versions they name."""
    return [Period(r["tier"], book[r["price_id"]], r["first_day"], r["last_day"]) for r in rows]


def adjustment(late: Any, parts: Sequence[Period], units: Mapping[date, int]) -> Adjustment:
    """One line for usage of a final month recorded after it was final: the
    month priced again with today's usage, less what was billed for it."""
    month = late["month"]
    first, last = month_days(month)
    now_due = total(invoice_lines(month, parts, units))
    amount = now_due - (late["subtotal"] + late["adjusted_amount"])
    delta = int(late["current_units"]) - int(late["units"]) - int(late["adjusted_units"])
    line = Line(
        "adjustment",
        parts[0].tier if parts else "",
        f"{month:%B %Y}: {delta:+,} units recorded after invoice {late['number']} was final",
        Decimal(delta),
        Decimal(0),
        amount,
        first,
        last,
    )
    return Adjustment(line, late["id"], month, delta)


def month_of(text: str) -> date:
    """``YYYY-MM`` -> its first day."""
    try:
        year, mon = text.split("-")
        if len(year) != 4 or len(mon) != 2:
            raise ValueError
        return date(int(year), int(mon), 1)
    except ValueError:
        raise InputError(f"{text!r} is not a month like 2026-11") from None


def next_month(month: date) -> date:
    return month_days(month)[1] + timedelta(days=1)
