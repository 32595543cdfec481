"""Invoices from the real database, checked against invoices computed by
hand: each seeded tier, an overage in a graduated band, a tier change and a
price change mid-month, re-runs that change nothing, finalization that
nothing gets past, and late usage that becomes an adjustment on the next
invoice (through Kafka and a worker that finalized the month by itself)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from metering.accounts.service import AccountsService
from metering.billing.pricing import Price, month_days
from metering.billing.service import Billing
from metering.errors import InputError
from metering.settings import Settings
from tests.integration.conftest import eventually
from tests.integration.test_anomalies import publish
from tests.integration.test_cli import run_cli
from tests.integration.test_pipeline_db import event

SEP, OCT, NOV = date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1)  # 30, 31, 30 days


async def user_on(db: asyncpg.Connection, *history: tuple[date, str]) -> uuid.UUID:
    """A user whose tier history is exactly ``history`` (day, tier)."""
    user = await AccountsService(db, cache=None, pepper=None).create_user(
        email=f"u-{uuid.uuid4().hex[:8]}@example.com", tier=history[-1][1]
    )
    await db.execute("DELETE FROM user_tier_history WHERE user_id = $1", user.id)
    for day, tier in history:
        await db.execute(
            "INSERT INTO user_tier_history (user_id, effective_from, tier_id) "
            "SELECT $1, $2, id FROM access_tiers WHERE name = $3",
            user.id,
            day,
            tier,
        )
    return user.id


async def used(
    db: asyncpg.Connection, user: uuid.UUID, days: dict[date, int], refused: int = 0
) -> None:
    """daily_usage as the pipeline writes it: ``units`` billable, ``refused`` not."""
    await db.executemany(
        "INSERT INTO daily_usage (user_id, date, request_count, rejected_count, units) "
        "VALUES ($1, $2, $3::bigint + $4::bigint, $4, $3)",
        [(user, day, n, refused) for day, n in days.items()],
    )


def spread(month: date, total: int, first: int = 1, last: int | None = None) -> dict[date, int]:
    """``total`` units over days ``first``..``last`` of ``month``, the rest on the last day."""
    end = last or month_days(month)[1].day
    days = [month.replace(day=d) for d in range(first, end + 1)]
    each = total // len(days)
    out = dict.fromkeys(days, each)
    out[days[-1]] += total - each * len(days)
    return out


async def lines_of(db: asyncpg.Connection, user: uuid.UUID, month: date) -> list[tuple]:
    rows = await db.fetch(
        "SELECT l.kind, l.tier, l.quantity, l.amount, l.first_day, l.last_day "
        "FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id "
        "WHERE i.user_id = $1 AND i.month = $2 ORDER BY l.line_no",
        user,
        month,
    )
    return [tuple(r) for r in rows]


async def total_of(db: asyncpg.Connection, user: uuid.UUID, month: date) -> Decimal:
    return await db.fetchval(
        "SELECT total FROM invoices WHERE user_id = $1 AND month = $2", user, month
    )


async def test_each_seeded_tier_and_a_graduated_overage(db):
    before = date(2026, 1, 1)
    free = await user_on(db, (before, "free"))
    pro = await user_on(db, (before, "pro"))
    ent = await user_on(db, (before, "enterprise"))
    await used(db, free, spread(OCT, 45_000), refused=9_000)  # over its 30,000: overage is free
    await used(db, pro, spread(OCT, 6_500_000), refused=2_000_000)
    await used(db, ent, spread(OCT, 20_000_500))

    run = await Billing(db).bill(OCT)
    assert (run.invoices, run.changed) == (3, 3)
    last = date(2026, 10, 31)
    # free: base 0, no bands
    assert await lines_of(db, free, OCT) == [("base", "free", 31, Decimal("0.00"), OCT, last)]
    # pro: 6,500,000 - 1,000,000 included = 5,500,000 over: 4,000,000 at 0.50
    # per 1,000 = 2,000.00, then 1,500,000 at 0.30 = 450.00; base 49.00.
    # The 2,000,000 refused requests count nowhere.
    assert await lines_of(db, pro, OCT) == [
        ("base", "pro", 31, Decimal("49.00"), OCT, last),
        ("overage", "pro", 4_000_000, Decimal("2000.00"), OCT, last),
        ("overage", "pro", 1_500_000, Decimal("450.00"), OCT, last),
    ]
    assert await total_of(db, pro, OCT) == Decimal("2499.00")
    # enterprise: 500 over 20,000,000 at 0.20 = 0.10; base 499.00
    assert await total_of(db, ent, OCT) == Decimal("499.10")
    assert run.totals == {"USD": Decimal("2998.10")}
    units, requests = await db.fetchrow(
        "SELECT units, requests FROM invoices WHERE user_id = $1 AND month = $2", pro, OCT
    )
    assert (units, requests) == (6_500_000, 6_500_000)


async def test_a_tier_change_mid_month_prorates_by_day(db):
    user = await user_on(db, (date(2026, 3, 1), "pro"), (date(2026, 10, 11), "enterprise"))
    await used(db, user, {OCT.replace(day=d): 100_000 for d in range(1, 32)})
    await Billing(db).bill(OCT)
    # pro, Oct 1-10 (10 of 31 days): base 49 * 10/31 = 15.806.. -> 15.81;
    #   included round(1,000,000 * 10/31) = 322,581; used 1,000,000;
    #   677,419 over at 0.50 per 1,000 = 338.7095 -> 338.71
    # enterprise, Oct 11-31 (21 days): base 499 * 21/31 = 338.032.. -> 338.03;
    #   included round(20,000,000 * 21/31) = 13,548,387; used 2,100,000: none over
    assert await lines_of(db, user, OCT) == [
        ("base", "pro", 10, Decimal("15.81"), OCT, date(2026, 10, 10)),
        ("overage", "pro", 677_419, Decimal("338.71"), OCT, date(2026, 10, 10)),
        ("base", "enterprise", 21, Decimal("338.03"), date(2026, 10, 11), date(2026, 10, 31)),
    ]
    assert await total_of(db, user, OCT) == Decimal("692.55")


async def test_a_price_change_mid_month_and_another_currency_through_the_cli(database_url, db):
    s = Settings.from_env(database_url=database_url)
    assert run_cli(s, "tiers", "create", "metered", "--rate-limit", "600").returncode == 0
    first = run_cli(
        s, "tiers", "set-price", "metered", "--currency", "EUR", "--base", "10",
        "--included", "1000", "--band", "0:1", "--from", "2026-08-01",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = run_cli(
        s, "tiers", "set-price", "metered", "--currency", "EUR", "--base", "20",
        "--included", "2000", "--band", "0:2", "--from", "2026-09-16",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    user = await user_on(db, (date(2026, 8, 1), "metered"))
    await used(db, user, {**spread(SEP, 1_000, 1, 15), **spread(SEP, 3_000, 16, 30)})

    out = run_cli(s, "bill", "--month", "2026-09")
    assert out.returncode == 0, out.stderr
    # Sep 1-15 at the first price: base 10 * 15/30 = 5.00, included 500,
    #   1,000 used: 500 over at 1.00 per 1,000 = 0.50
    # Sep 16-30 at the second: base 20 * 15/30 = 10.00, included 1,000,
    #   3,000 used: 2,000 over at 2.00 = 4.00
    assert await lines_of(db, user, SEP) == [
        ("base", "metered", 15, Decimal("5.00"), SEP, date(2026, 9, 15)),
        ("overage", "metered", 500, Decimal("0.50"), SEP, date(2026, 9, 15)),
        ("base", "metered", 15, Decimal("10.00"), date(2026, 9, 16), date(2026, 9, 30)),
        ("overage", "metered", 2_000, Decimal("4.00"), date(2026, 9, 16), date(2026, 9, 30)),
    ]
    assert "total 19.50 EUR" in out.stdout
    shown = run_cli(s, "invoices", "show", str(await db.fetchval("SELECT id FROM invoices")))
    assert shown.returncode == 0, shown.stderr
    assert "total 19.50 EUR" in shown.stdout and "4,000 billable units" in shown.stdout
    # a price of a day already on an invoice is not replaced
    again = run_cli(s, "tiers", "set-price", "metered", "--base", "1", "--from", "2026-09-16")
    assert again.returncode == 2 and "on invoices" in again.stderr


async def test_a_rerun_is_identical_and_a_final_month_never_changes(database_url, db):
    s = Settings.from_env(database_url=database_url)
    user = await user_on(db, (date(2026, 1, 1), "pro"))
    await used(db, user, spread(SEP, 1_200_000))
    await used(db, user, spread(OCT, 5_000_000))
    billing = Billing(db)
    await billing.bill(OCT)
    snapshot = await db.fetch("SELECT * FROM invoices ORDER BY id")
    lines = await db.fetch("SELECT * FROM invoice_lines ORDER BY invoice_id, line_no")
    rerun = await billing.bill(OCT)
    assert (rerun.invoices, rerun.changed) == (1, 0)
    assert await db.fetch("SELECT * FROM invoices ORDER BY id") == snapshot
    assert await db.fetch("SELECT * FROM invoice_lines ORDER BY invoice_id, line_no") == lines

    # months finalize in order: with September billed (a draft), October waits for it
    await billing.bill(SEP)
    refused = run_cli(s, "invoices", "finalize", "--month", "2026-10")
    assert refused.returncode == 2 and "finalize 2026-09 first" in refused.stderr
    for month in ("2026-09", "2026-10"):
        out = run_cli(s, "invoices", "finalize", "--month", month)
        assert out.returncode == 0, out.stderr
        assert "1 made final" in out.stdout
    final = await db.fetchrow("SELECT * FROM invoices WHERE month = $1", OCT)
    assert final["status"] == "final" and final["number"].startswith("INV-202610-")
    # October: 4,000,000 over at 0.50 = 2,000.00; base 49.00
    assert final["total"] == Decimal("2049.00")

    # nothing gets past: not the CLI, not the service, not SQL
    out = run_cli(s, "bill", "--month", "2026-10")
    assert out.returncode == 2 and "2026-10 is final" in out.stderr
    out = run_cli(s, "tiers", "set-price", "pro", "--base", "59", "--from", "2026-10-15")
    assert out.returncode == 2 and "2026-10 is final" in out.stderr
    for sql in (
        "UPDATE invoices SET total = 0, subtotal = 0 WHERE id = $1",
        "DELETE FROM invoices WHERE id = $1",
        "UPDATE invoice_lines SET amount = 0 WHERE invoice_id = $1",
        "DELETE FROM invoice_usage WHERE invoice_id = $1",
        "INSERT INTO invoice_lines (invoice_id, line_no, kind, description, quantity, amount, "
        "first_day, last_day) VALUES ($1, 99, 'base', 'x', 1, 1, '2026-10-01', '2026-10-01')",
    ):
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="is final"):
            await db.execute(sql, final["id"])
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
        await db.execute("UPDATE billing_months SET status = 'draft' WHERE month = $1", OCT)
    await billing.bill(NOV)  # a draft to move lines from
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):  # moved in from a draft
        await db.execute(
            "UPDATE invoice_lines SET invoice_id = $1 WHERE invoice_id <> $1", final["id"]
        )
    for table in ("invoices", "invoice_lines", "invoice_usage", "billing_months"):
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
            await db.execute(f"TRUNCATE {table} CASCADE")
    assert await db.fetchrow("SELECT * FROM invoices WHERE month = $1", OCT) == final
    # a month that has not ended cannot be final
    this_month = datetime.now(UTC).strftime("%Y-%m")
    out = run_cli(s, "invoices", "finalize", "--month", this_month)
    assert out.returncode == 2 and "has not ended" in out.stderr


async def test_late_usage_of_a_final_month_is_an_adjustment_on_the_next_invoice(
    kafka_settings, db, worker_factory
):
    """The worker finalizes last month by itself (grace 0); usage for it that
    arrives afterwards, through Kafka, changes nothing on it and becomes one
    adjustment line on this month's invoice."""
    s = kafka_settings
    today = datetime.now(UTC).date()
    this_month = today.replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    accounts = AccountsService(db, cache=None, pepper=None)
    await accounts.create_tier(name="small", daily_quota=None, rate_limit_per_minute=600)
    await Billing(db).set_price("small", price("10.00", 1_000, "1.00"), since=date(2020, 1, 1))
    user = await user_on(db, (date(2020, 1, 1), "small"))
    await used(db, user, {last_month.replace(day=3): 1_500})

    worker = worker_factory(s, METERING_BILLING_GRACE_DAYS="0")

    async def final() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT * FROM invoices WHERE user_id = $1 AND month = $2 AND status = 'final'",
            user,
            last_month,
        )

    async def finalized() -> bool:
        worker.assert_running()
        return await final() is not None

    await eventually(finalized, timeout=90, what="the worker to finalize last month")
    closed = await final()
    assert closed is not None
    # base 10.00, 1,500 used - 1,000 included = 500 over at 1.00 per 1,000 = 0.50
    assert closed["total"] == Decimal("10.50") and closed["finalized_by"].startswith("worker")

    late_at = datetime.combine(last_month.replace(day=20), datetime.min.time(), UTC) + timedelta(
        hours=12
    )
    await publish(s, [event(user, late_at + timedelta(seconds=i), units=100) for i in range(7)])

    async def landed() -> bool:
        worker.assert_running()
        n = await db.fetchval(
            "SELECT units FROM daily_usage WHERE user_id = $1 AND date = $2", user, late_at.date()
        )
        return n == 700

    await eventually(landed, timeout=60, what="the late events in daily_usage")
    run = await Billing(db).bill(this_month)
    assert run.adjustments == 1
    # last month again with 2,200 units: 1,200 over = 1.20, of which 0.50 was billed
    adj = await db.fetchrow(
        "SELECT l.* FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id "
        "WHERE i.user_id = $1 AND i.month = $2 AND l.kind = 'adjustment'",
        user,
        this_month,
    )
    assert (adj["amount"], adj["units_delta"], adj["refers_to"], adj["refers_to_month"]) == (
        Decimal("0.70"),
        700,
        closed["id"],
        last_month,
    )
    assert closed["number"] in adj["description"]
    inv = await db.fetchrow(
        "SELECT * FROM invoices WHERE user_id = $1 AND month = $2", user, this_month
    )
    assert (inv["subtotal"], inv["adjustments"], inv["total"]) == (
        Decimal("10.00"),
        Decimal("0.70"),
        Decimal("10.70"),
    )
    # the final invoice did not move, and billing again adds nothing twice
    assert await db.fetchrow("SELECT * FROM invoices WHERE id = $1", closed["id"]) == closed
    again = await Billing(db).bill(this_month)
    assert (again.adjustments, again.changed) == (1, 0)


def price(base: str, included: int, per_1000: str):
    from metering.billing.pricing import Band, Price

    return Price("USD", Decimal(base), included, (Band(0, Decimal(per_1000)),))


def test_bad_billing_arguments_get_one_line_and_exit_2(services):
    s = Settings.from_env()
    for args, text in [
        (("bill", "--month", "2026-13"), "not a month"),
        (("bill", "--month", "November"), "not a month"),
        (("bill",), "--month"),
        (("invoices", "finalize"), "one of the arguments"),
        (("tiers", "set-price", "pro", "--base", "-1"), "must be >= 0"),
        (("tiers", "set-price", "pro", "--base", "1", "--band", "x"), "not a band"),
        (("tiers", "set-price", "pro", "--base", "1", "--currency", "usd"), "three capital"),
        (("tiers", "set-price", "pro", "--base", "1", "--from", "tomorrow"), "not a day"),
    ]:
        out = run_cli(s, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert text in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)


async def test_the_tier_history_follows_every_change_and_the_last_of_a_day_wins(db):
    accounts = AccountsService(db, cache=None, pepper=None)
    user = await accounts.create_user(email="history@example.com", tier="free")
    today = datetime.now(UTC).date()
    history = "SELECT effective_from, tier_id FROM user_tier_history WHERE user_id = $1"
    tier = "SELECT id FROM access_tiers WHERE name = $1"
    assert [tuple(r) for r in await db.fetch(history, user.id)] == [
        (today, await db.fetchval(tier, "free"))
    ]
    await accounts.set_tier(user.id, "pro")
    await accounts.set_tier(user.id, "enterprise")
    assert [tuple(r) for r in await db.fetch(history, user.id)] == [
        (today, await db.fetchval(tier, "enterprise"))
    ]
    # a user who joined today is billed from today: days before it are not theirs
    run = await Billing(db).bill(today.replace(day=1), users=[user.id])
    _, last = month_days(today)
    days = (last - today).days + 1
    expected = (Decimal(499) * days / last.day).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
    assert run.totals == {"USD": expected}


async def test_an_invoice_renders_to_pdf_and_html_with_the_figures_of_daily_usage(
    database_url, db, tmp_path
):
    import pypdf

    s = Settings.from_env(database_url=database_url)
    user = await user_on(db, (date(2026, 1, 1), "pro"))
    await db.execute("UPDATE users SET name = $2 WHERE id = $1", user, "Zoë <script>x</script> Ltd")
    days = {OCT.replace(day=d): 100_000 + 1_234 * d for d in range(1, 32)}
    await used(db, user, days, refused=77)
    await Billing(db).bill(OCT)
    await Billing(db).finalize(OCT, by="finance", today=date(2026, 11, 4))
    number = await db.fetchval("SELECT number FROM invoices WHERE user_id = $1", user)
    pdf, page = tmp_path / "invoice.pdf", tmp_path / "invoice.html"
    out = run_cli(s, "invoices", "render", number, "--pdf", str(pdf), "--html", str(page))
    assert out.returncode == 0, out.stderr

    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(pdf).pages)
    stored = await db.fetch(
        "SELECT date, request_count - rejected_count AS served, units FROM daily_usage "
        "WHERE user_id = $1 ORDER BY date",
        user,
    )
    assert len(stored) == 31
    units = sum(r["units"] for r in stored)  # 3,100,000 + 1,234 * 496 = 3,712,064
    # 2,712,064 over at 0.50 per 1,000 = 1,356.032 -> 1,356.03; base 49.00
    for figure in (f"Invoice {number}", "Zoë", "1,356.03 USD", "Total 1,405.03 USD",
                   f"{units:,} billable units"):  # fmt: skip
        assert figure in text, figure
    for r in stored:
        assert f"{r['date']:%Y-%m-%d} {r['served']:,} {r['units']:,}" in text
    html = page.read_text()
    assert "<script>x" not in html and "&lt;script&gt;x" in html
    assert "1,405.03 USD" in html and html.count("<tr><td>2026-10-") == 31
    assert all(f"{r['units']:,}" in html for r in stored)
    missing = run_cli(s, "invoices", "render", number)
    assert missing.returncode == 2 and "--pdf" in missing.stderr


async def test_several_late_months_gaps_and_a_deleted_customer(db):
    """Late usage of two final months lands once each on the next open
    invoice, and not again after that one is final; months cannot be skipped
    or billed out of order; a deleted customer gets only their corrections."""
    await AccountsService(db, cache=None, pepper=None).create_tier(
        name="unit", daily_quota=None, rate_limit_per_minute=600
    )
    billing = Billing(db)
    await billing.set_price("unit", price("10.00", 1_000, "1000"), since=date(2020, 1, 1))
    user = await user_on(db, (date(2020, 1, 1), "unit"))  # 10.00 a month, 1.00 a unit over 1,000
    gone = await user_on(db, (date(2020, 1, 1), "unit"))
    await used(db, user, {SEP.replace(day=5): 1_500, OCT.replace(day=5): 1_000})
    await used(db, gone, {SEP.replace(day=5): 1_000})
    await billing.finalize(SEP, by="t", today=date(2026, 10, 4))
    # October cannot be skipped, and August cannot come after September
    with pytest.raises(InputError, match="finalize 2026-10 first"):
        await billing.finalize(NOV, by="t", today=date(2026, 12, 4))
    with pytest.raises(InputError, match="comes before 2026-09"):
        await billing.bill(date(2026, 8, 1))
    # the workers' catch-up after a pause: October, then November, in order
    runs = await billing.finalize_due(grace=timedelta(days=3), by="t",
                                      now=datetime(2026, 12, 10, tzinfo=UTC))  # fmt: skip
    assert [r.month for r in runs] == [OCT, NOV]
    assert await total_of(db, user, SEP) == Decimal("510.00")  # 10 + 500 over
    assert await total_of(db, user, OCT) == Decimal("10.00")

    # late usage for both months; the second customer is deleted meanwhile
    await db.execute("UPDATE daily_usage SET units = units + 100 WHERE user_id = $1 AND date = $2",
                     user, SEP.replace(day=5))  # fmt: skip
    await db.execute("UPDATE daily_usage SET units = units + 200 WHERE user_id = $1 AND date = $2",
                     user, OCT.replace(day=5))  # fmt: skip
    await db.execute("UPDATE daily_usage SET units = units + 30 WHERE user_id = $1 AND date = $2",
                     gone, SEP.replace(day=5))  # fmt: skip
    await db.execute("UPDATE users SET status = 'deleted' WHERE id = $1", gone)
    dec = date(2026, 12, 1)
    run = await billing.bill(dec, today=date(2026, 12, 11))
    assert run.adjustments == 3 and run.errors == []
    assert [(r["refers_to_month"], r["units_delta"], r["amount"]) for r in await adjustments(db, user, dec)] == [
        (SEP, 100, Decimal("100.00")), (OCT, 200, Decimal("200.00")),
    ]  # fmt: skip
    assert await total_of(db, user, dec) == Decimal("310.00")
    # the deleted customer: their September correction (they had used exactly
    # the 1,000 included: 30 more at 1.00), and no base price for December
    assert await lines_of(db, gone, dec) == [
        ("adjustment", "unit", 30, Decimal("30.00"), SEP, date(2026, 9, 30))
    ]
    # December final: nothing is carried twice into January
    await billing.finalize(dec, by="t", today=date(2027, 1, 5))
    jan = date(2027, 1, 1)
    again = await billing.bill(jan, today=date(2027, 1, 5))
    assert again.adjustments == 0
    await db.execute("UPDATE daily_usage SET units = units + 50 WHERE user_id = $1 AND date = $2",
                     user, SEP.replace(day=5))  # fmt: skip
    late = await billing.bill(jan, today=date(2027, 1, 6))
    assert late.adjustments == 1
    assert [
        (r["refers_to_month"], r["units_delta"], r["amount"])
        for r in await adjustments(db, user, jan)
    ] == [(SEP, 50, Decimal("50.00"))]


async def test_a_customer_who_cannot_be_billed_is_reported_and_blocks_finalization(db):
    accounts = AccountsService(db, cache=None, pepper=None)
    await accounts.create_tier(name="euro", daily_quota=None, rate_limit_per_minute=600)
    billing = Billing(db)
    await billing.set_price("euro", Price("EUR", Decimal(5), 0, ()), since=date(2020, 1, 1))
    fine = await user_on(db, (date(2020, 1, 1), "pro"))
    mixed = await user_on(db, (date(2020, 1, 1), "euro"), (date(2026, 10, 1), "pro"))
    await used(db, mixed, {SEP.replace(day=3): 10})
    await billing.finalize(SEP, by="t", today=date(2026, 10, 4))
    await db.execute("UPDATE daily_usage SET units = units + 5 WHERE user_id = $1", mixed)
    run = await billing.bill(OCT, today=date(2026, 10, 20))  # a EUR correction on a USD invoice
    assert len(run.errors) == 1 and str(mixed) in run.errors[0] and "EUR" in run.errors[0]
    assert await total_of(db, fine, OCT) == Decimal("49.00")  # the others are billed
    with pytest.raises(InputError, match="cannot be billed"):
        await billing.finalize(OCT, by="t", today=date(2026, 11, 4))
    assert (
        await db.fetchval(
            "SELECT count(*) FROM invoices WHERE status = 'final' AND month = $1", OCT
        )
        == 0
    )


async def adjustments(db: asyncpg.Connection, user: uuid.UUID, month: date) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT l.refers_to_month, l.units_delta, l.amount FROM invoice_lines l "
        "JOIN invoices i ON i.id = l.invoice_id "
        "WHERE i.user_id = $1 AND i.month = $2 AND l.kind = 'adjustment' ORDER BY l.refers_to_month",
        user,
        month,
    )
