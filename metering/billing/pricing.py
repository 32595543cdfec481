"""Prices and the arithmetic of an invoice: exact decimals, never floats.

A tier's price (:class:`Price`) is a currency, a monthly base price, the
billable units it includes each month, and overage priced per 1,000 units,
graduated in bands (:class:`Band`): a band's price applies to the overage
units from its ``from_units`` up to the next band's.

The rule for a month (:func:`invoice_lines`), written down because finance
will check it by hand:

* the month is split into periods, one per tier (and price version) the
  user was on: a change takes effect on the UTC day it is made and counts
  from that day; a user who joined mid-month starts on the day they joined
  (usage recorded before that day counts in their first period);
* a period of ``d`` of the month's ``D`` days pays ``base * d / D`` and
  includes ``round(included * d / D)`` units; its bands start at
  ``round(from_units * d / D)`` overage units (so splitting a month at an
  unchanged price changes nothing but rounding);
* the billable units of the period's days (requests the edge served, their
  ``units``) beyond its included units are overage, priced band by band, one
  line per band used;
* every line's amount is rounded to the currency's cents once, half up; the
  total is the sum of the lines.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import pairwise

from metering.errors import InputError

CENT = Decimal("0.01")
MAX_BASE = Decimal(10) ** 10
MAX_PER_1000 = Decimal(10) ** 8
MAX_UNITS = 2**63


def _places(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


THOUSAND = Decimal(1000)


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class Band:
    from_units: int  # overage units where this band's price starts
    per_1000: Decimal


@dataclass(frozen=True, slots=True)
class Price:
    currency: str
    base_monthly: Decimal
    included_units: int
    bands: tuple[Band, ...] = ()
    id: int | None = field(default=None, compare=False)  # the stored version, if any

    def __post_init__(self) -> None:
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise InputError(f"currency {self.currency!r}: three capital letters, e.g. EUR")
        if not self.base_monthly.is_finite() or any(not b.per_1000.is_finite() for b in self.bands):
            raise InputError("prices must be finite numbers")
        if self.base_monthly < 0 or self.included_units < 0:
            raise InputError("base price and included units cannot be negative")
        # what the columns hold exactly (numeric(12,2), numeric(14,6), bigint): never rounded
        if self.base_monthly >= MAX_BASE or _places(self.base_monthly) > 2:
            raise InputError(f"a base price is below {MAX_BASE:,} with at most 2 decimals")
        if any(b.per_1000 >= MAX_PER_1000 or _places(b.per_1000) > 6 for b in self.bands):
            raise InputError(
                f"a price per 1,000 units is below {MAX_PER_1000:,}, at most 6 decimals"
            )
        if self.included_units >= MAX_UNITS or any(b.from_units >= MAX_UNITS for b in self.bands):
            raise InputError("units are below 2^63")
        starts = [b.from_units for b in self.bands]
        if self.bands and (starts[0] != 0 or starts != sorted(set(starts))):
            raise InputError("overage bands start at 0 and rise strictly, e.g. 0, 1000000")
        if any(b.per_1000 < 0 for b in self.bands):
            raise InputError("a band's price per 1,000 units cannot be negative")


@dataclass(frozen=True, slots=True)
class Period:
    tier: str
    price: Price
    first_day: date
    last_day: date  # inclusive

    @property
    def days(self) -> int:
        return (self.last_day - self.first_day).days + 1


@dataclass(frozen=True, slots=True)
class Line:
    kind: str  # base | overage
    tier: str
    description: str
    quantity: Decimal  # days, or units
    unit_price: Decimal  # per day's share, or per 1,000 units
    amount: Decimal  # rounded to cents
    first_day: date
    last_day: date


def month_days(month: date) -> tuple[date, date]:
    """The first and last day of ``month``'s month."""
    first = month.replace(day=1)
    return first, first.replace(day=calendar.monthrange(first.year, first.month)[1])


def periods(month: date, tiers: Sequence[tuple[date, str, Price]]) -> list[Period]:
    """The month split by tier: ``tiers`` are (the day it took effect, name, price),
    oldest first. Empty when none took effect by the month's last day."""
    first, last = month_days(month)
    if any(a[0] >= b[0] for a, b in pairwise(tiers)):
        raise InputError("a tier history must be in order of its days, one entry per day")
    out: list[Period] = []
    for i, (since, name, price) in enumerate(tiers):
        until = tiers[i + 1][0] - timedelta(days=1) if i + 1 < len(tiers) else last
        start, end = max(since, first), min(until, last)
        if start <= end:
            out.append(Period(name, price, start, end))
    return out


def overage(units: int, bands: Sequence[Band]) -> list[tuple[Band, int]]:
    """How many overage units fall in each band (bands with none left out)."""
    out = []
    for i, band in enumerate(bands):
        top = bands[i + 1].from_units if i + 1 < len(bands) else None
        inside = max(0, (units if top is None else min(units, top)) - band.from_units)
        if inside:
            out.append((band, inside))
    return out


def invoice_lines(month: date, parts: Sequence[Period], units: Mapping[date, int]) -> list[Line]:
    """The month's lines for one user: each period's base price and its overage."""
    first, last = month_days(month)
    days_in_month = Decimal(last.day)
    lines: list[Line] = []
    for i, p in enumerate(parts):
        share = Decimal(p.days) / days_in_month
        per_day = p.price.base_monthly / days_in_month
        lines.append(
            Line(
                "base",
                p.tier,
                f"{p.tier}: base price, {p.days} of {last.day} days",
                Decimal(p.days),
                per_day,
                cents(p.price.base_monthly * share),
                p.first_day,
                p.last_day,
            )
        )
        included = prorated(p.price.included_units, share)
        # the bands' thresholds shrink with the period, like the included units:
        # a month split in two at an unchanged price costs what it did whole
        bands = [Band(prorated(b.from_units, share), b.per_1000) for b in p.price.bands]
        used = sum(
            n for day, n in units.items() if (p.first_day if i else first) <= day <= p.last_day
        )
        for band, n in overage(max(0, used - included), bands):
            lines.append(
                Line(
                    "overage",
                    p.tier,
                    f"{p.tier}: {n:,} units over the {included:,} included"
                    + (f", from unit {band.from_units + 1:,} over" if band.from_units else ""),
                    Decimal(n),
                    band.per_1000,
                    cents(Decimal(n) * band.per_1000 / THOUSAND),
                    p.first_day,
                    p.last_day,
                )
            )
    return lines


def prorated(units: int, share: Decimal) -> int:
    return int((Decimal(units) * share).to_integral_value(ROUND_HALF_UP))


def total(lines: Sequence[Line]) -> Decimal:
    return sum((line.amount for line in lines), Decimal("0.00"))


def band(text: str) -> Band:
    """``FROM:PRICE`` (overage units from which, price per 1,000), e.g. ``0:0.50``."""
    try:
        start, price = text.split(":")
        return Band(int(start.replace("_", "").replace(",", "")), Decimal(price))
    except (ValueError, ArithmeticError):
        raise InputError(f"{text!r} is not a band like 0:0.50 or 1000000:0.30") from None
