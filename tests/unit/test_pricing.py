"""Invoice arithmetic against invoices computed by hand (exact decimals)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest

from metering.billing.pricing import Band, Price, invoice_lines, periods, total
from metering.errors import InputError

FREE = Price("USD", Decimal("0"), 1_000, (Band(0, Decimal("2.00")),))
PRO = Price(
    "USD", Decimal("49.00"), 100_000, (Band(0, Decimal("0.50")), Band(1_000_000, Decimal("0.30")))
)
NOV = date(2026, 11, 1)  # 30 days


def daily(first: date, days: int, units: int) -> dict[date, int]:
    return {first + timedelta(days=i): units for i in range(days)}


def test_a_full_month_with_overage_in_a_graduated_band():
    # 1,250,000 units: 1,150,000 over the 100,000 included;
    # 1,000,000 x 0.50/1000 = 500.00, then 150,000 x 0.30/1000 = 45.00
    lines = invoice_lines(
        NOV, periods(NOV, [(date(2026, 1, 1), "pro", PRO)]), daily(NOV, 25, 50_000)
    )
    assert [(ln.kind, ln.quantity, ln.amount) for ln in lines] == [
        ("base", 30, Decimal("49.00")),
        ("overage", 1_000_000, Decimal("500.00")),
        ("overage", 150_000, Decimal("45.00")),
    ]
    assert total(lines) == Decimal("594.00")


def test_within_the_included_units_only_the_base_price():
    lines = invoice_lines(NOV, periods(NOV, [(NOV, "pro", PRO)]), daily(NOV, 30, 3_000))
    assert total(lines) == Decimal("49.00") and len(lines) == 1


def test_a_tier_change_mid_month_prorates_by_day():
    # free for 1-10 Nov, pro from 11 Nov (20 days):
    # free: base 0; included round(1000 x 10/30) = 333; 1,000 used -> 667 x 2.00/1000 = 1.334 -> 1.33
    # pro: base 49 x 20/30 = 32.666.. -> 32.67; included round(100000 x 20/30) = 66,667;
    #      200,000 used -> 133,333 x 0.50/1000 = 66.6665 -> 66.67 (half up)
    history = [(date(2026, 6, 1), "free", FREE), (date(2026, 11, 11), "pro", PRO)]
    usage = daily(NOV, 10, 100) | daily(date(2026, 11, 11), 20, 10_000)
    lines = invoice_lines(NOV, periods(NOV, history), usage)
    assert [(ln.tier, ln.kind, ln.quantity, ln.amount) for ln in lines] == [
        ("free", "base", 10, Decimal("0.00")),
        ("free", "overage", 667, Decimal("1.33")),
        ("pro", "base", 20, Decimal("32.67")),
        ("pro", "overage", 133_333, Decimal("66.67")),
    ]
    assert total(lines) == Decimal("100.67")


def test_a_month_split_at_an_unchanged_price_costs_what_it_did_whole():
    # 2,100,000 units, 70,000 a day. Whole: 2,000,000 over the 100,000 included:
    # 1,000,000 x 0.50 = 500.00 + 1,000,000 x 0.30 = 300.00 + 49.00 = 849.00.
    # Split on the 16th (15 + 15 days): each half includes 50,000 and its
    # second band starts at 500,000 over: 24.50 + 250.00 + 150.00, twice.
    usage = daily(NOV, 30, 70_000)
    whole = invoice_lines(NOV, periods(NOV, [(NOV, "pro", PRO)]), usage)
    split = invoice_lines(
        NOV, periods(NOV, [(NOV, "pro", PRO), (date(2026, 11, 16), "pro", PRO)]), usage
    )
    assert total(whole) == total(split) == Decimal("849.00")
    assert [(ln.quantity, ln.amount) for ln in split if ln.kind == "overage"] == [
        (500_000, Decimal("250.00")), (500_000, Decimal("150.00")),
        (500_000, Decimal("250.00")), (500_000, Decimal("150.00")),
    ]  # fmt: skip


def test_a_leap_february_and_a_change_after_the_month():
    feb = date(2028, 2, 1)
    parts = periods(feb, [(date(2027, 1, 1), "pro", PRO), (date(2028, 3, 5), "free", FREE)])
    assert [(p.tier, p.first_day, p.last_day, p.days) for p in parts] == [
        ("pro", feb, date(2028, 2, 29), 29)
    ]
    assert total(invoice_lines(feb, parts, {})) == Decimal("49.00")


def test_bad_prices_and_histories_are_refused():
    with pytest.raises(InputError):
        Price("usd", Decimal(1), 0)
    with pytest.raises(InputError):
        Price("USD", Decimal(1), 0, (Band(10, Decimal(1)),))
    with pytest.raises(InputError):
        Price("USD", Decimal(1), 0, (Band(0, Decimal(1)), Band(0, Decimal(2))))
    with pytest.raises(InputError):
        periods(NOV, [(date(2026, 11, 2), "pro", PRO), (date(2026, 11, 2), "free", FREE)])


def test_a_user_who_joins_mid_month_pays_from_that_day():
    # joined on the 21st: 10 of 30 days; included round(100,000 / 3) = 33,333.
    # The 2,000 units recorded on the 20th (a clock ahead of ours) count too,
    # October's 99 do not: 2,000 + 32,333 = 34,333 used, 1,000 over at 0.50
    # = 0.50; base 49 * 10 / 30 = 16.333.. -> 16.33; total 16.83.
    parts = periods(NOV, [(date(2026, 11, 21), "pro", PRO)])
    assert [(p.first_day, p.days) for p in parts] == [(date(2026, 11, 21), 10)]
    units = {date(2026, 11, 20): 2000, date(2026, 11, 25): 32_333, date(2026, 10, 31): 99}
    lines = invoice_lines(NOV, parts, units)
    assert [(ln.kind, ln.quantity, ln.amount) for ln in lines] == [
        ("base", Decimal(10), Decimal("16.33")),
        ("overage", Decimal(1000), Decimal("0.50")),
    ]
    assert total(lines) == Decimal("16.83")
    assert periods(NOV, [(date(2026, 12, 1), "pro", PRO)]) == []
