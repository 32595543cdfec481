"""The analyst's side against the real database: latency percentiles from
the pipeline's histograms within 2 % of the raw rows', the views, the ten
documented queries (each plans one partition and an index), and
`metering usage rebuild` (diff, apply, and a final month's adjustment)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import pytest

from metering.accounts.service import AccountsService
from metering.billing.pricing import Band, Price
from metering.billing.service import Billing
from metering.dev.analyst_queries import bound, nodes, ten_queries
from metering.dev.usage_data import fill_month, make_users
from metering.settings import Settings
from metering.usage.rebuild import Rebuild
from tests.integration.test_cli import run_cli
from tests.integration.test_pipeline_db import event, pipeline_for, raw

SEP, OCT, NOV = date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1)
QUANTILES = (0.5, 0.95, 0.99)


def latencies(rng: random.Random, endpoint: int, n: int) -> list[float]:
    """Three shapes: a tight log-normal, a wide one, and a bimodal (cache hit or miss)."""
    if endpoint == 0:
        return [round(rng.lognormvariate(3.0, 0.3), 3) for _ in range(n)]
    if endpoint == 1:
        return [round(rng.lognormvariate(4.5, 1.1), 3) for _ in range(n)]
    return [round(rng.choice((rng.gauss(2, 0.3), rng.gauss(300, 40))), 3) + 0.5 for _ in range(n)]


async def test_latency_percentiles_from_the_histograms_are_within_2_percent(
    database_url, db, redis_client, redis_prefix
):
    rng = random.Random(7)
    user, keys = uuid.uuid4(), (uuid.uuid4(), uuid.uuid4())
    day = datetime.now(UTC).date() - timedelta(days=1)
    start = datetime.combine(day, time(), UTC)
    events = []
    for ep in range(3):
        for ms in latencies(rng, ep, 10_000):
            at = start + timedelta(seconds=rng.uniform(0, 86_399))
            events.append(event(user, at, endpoint=f"/v1/e{ep}", response_time_ms=max(ms, 0.0),
                                api_key_id=rng.choice(keys)))  # fmt: skip
    # refused requests: recorded, counted, never in the latency histograms
    events += [event(user, start + timedelta(seconds=i), endpoint="/v1/e0", api_key_id=keys[0],
                     rejected="rate_limited", status_code=429, response_time_ms=0.2)
               for i in range(500)]  # fmt: skip
    rng.shuffle(events)
    pipeline = pipeline_for(database_url, redis_client, redis_prefix)
    async with pipeline:
        for i in range(0, len(events), 2_000):  # 16 batches: the histograms merge as they grow
            await pipeline.process(raw(events[i : i + 2_000]))
        before = await db.fetch("SELECT * FROM daily_endpoint_usage ORDER BY api_key_id, endpoint")
        await pipeline.process(raw(events[:5_000]))  # a replay adds nothing
    assert (
        await db.fetch("SELECT * FROM daily_endpoint_usage ORDER BY api_key_id, endpoint") == before
    )
    # what the pipeline wrote batch by batch is what a rebuild from the raw rows gives
    rebuilt = await Rebuild(db).run(day, apply=False)
    assert rebuilt.raw_rows == 30_500 and rebuilt.clean, (
        rebuilt.daily_diffs,
        rebuilt.endpoint_diffs,
    )

    exact = """
        SELECT endpoint, count(*) AS n,
               percentile_disc(0.5) WITHIN GROUP (ORDER BY response_time_ms) AS p50,
               percentile_disc(0.95) WITHIN GROUP (ORDER BY response_time_ms) AS p95,
               percentile_disc(0.99) WITHIN GROUP (ORDER BY response_time_ms) AS p99
        FROM usage_logs WHERE user_id = $1 AND rejected IS NULL GROUP BY ROLLUP (endpoint)"""
    sketch = """
        SELECT endpoint, sum(requests - refused) AS n,
               latency_quantile(hist_concat(latency_buckets), hist_concat(latency_counts), 0.5) AS p50,
               latency_quantile(hist_concat(latency_buckets), hist_concat(latency_counts), 0.95) AS p95,
               latency_quantile(hist_concat(latency_buckets), hist_concat(latency_counts), 0.99) AS p99
        FROM daily_endpoint_usage WHERE user_id = $1 GROUP BY ROLLUP (endpoint)"""
    truth = {r["endpoint"]: r for r in await db.fetch(exact, user)}
    read = {r["endpoint"]: r for r in await db.fetch(sketch, user)}
    assert set(truth) == set(read) == {"/v1/e0", "/v1/e1", "/v1/e2", None}  # None: all three
    worst = 0.0
    for ep, t in truth.items():
        assert read[ep]["n"] == t["n"]
        for p in ("p50", "p95", "p99"):
            error = abs(read[ep][p] - t[p]) / t[p]
            worst = max(worst, error)
            assert error <= 0.02, (ep, p, read[ep][p], t[p])
    assert worst > 0  # the histogram is an approximation, not the raw rows again
    # per key and day, through the view
    per_key = await db.fetch(
        "SELECT api_key_id, requests, refused, p95_ms FROM key_daily_usage WHERE user_id = $1", user
    )
    assert (
        sum(r["requests"] for r in per_key) == 30_500 and sum(r["refused"] for r in per_key) == 500
    )
    for r in per_key:
        t = await db.fetchval(
            "SELECT percentile_disc(0.95) WITHIN GROUP (ORDER BY response_time_ms) FROM usage_logs "
            "WHERE api_key_id = $1 AND rejected IS NULL",
            r["api_key_id"],
        )
        assert abs(r["p95_ms"] - t) / t <= 0.02


@pytest.fixture
async def history(db) -> uuid.UUID:
    """300 users, two keys each, three months of raw events (~135,000) and
    their daily tables; October is billed. Returns one user."""
    keys = await make_users(db, 300)
    for month in (SEP, OCT, NOV):
        await fill_month(db, keys, month, per_key=75)
    await db.execute("ANALYZE")
    user = keys[0][0]
    await Billing(db).bill(OCT, users=[user])
    return user


async def test_the_ten_documented_queries_prune_to_one_month_and_use_indexes(db, history):
    queries = ten_queries()
    assert [t.split(".")[0] for t, _ in queries] == [str(i) for i in range(1, 11)]
    for title, sql in queries:
        plan = await db.fetchval(f"EXPLAIN (FORMAT JSON) {bound(sql)}", history, OCT)
        tree = nodes(json.loads(plan)[0]["Plan"])
        relations = {n["Relation Name"] for n in tree if "Relation Name" in n}
        partitions = {r for r in relations if r.startswith("usage_logs")}
        if "usage_logs" in sql:
            assert partitions == {"usage_logs_y2026m10"}, (title, relations)
        big = partitions | {"daily_usage", "daily_endpoint_usage"}
        seq = [
            n["Relation Name"]
            for n in tree
            if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in big
        ]
        assert seq == [], (title, seq)
        assert any("Index" in n["Node Type"] for n in tree), title
        rows = await db.fetch(bound(sql), history, OCT)
        assert rows, title  # each answers for the customer's month


async def test_the_views_agree_with_the_daily_tables(db, history):
    month = await db.fetchrow(
        "SELECT * FROM monthly_usage WHERE user_id = $1 AND month = $2", history, OCT
    )
    units = await db.fetchval(
        "SELECT sum(units) FROM usage_logs WHERE user_id = $1 AND rejected IS NULL "
        "AND created_at >= '2026-10-01T00:00Z' AND created_at < '2026-11-01T00:00Z'",
        history,
    )
    assert month["units"] == units and month["requests"] == 150
    top = await db.fetch("SELECT * FROM top_consumers WHERE month = $1 ORDER BY rank", OCT)
    assert len(top) == 300 and top[0]["units"] >= top[-1]["units"]
    ep = await db.fetch("SELECT * FROM endpoint_daily_usage WHERE date = '2026-10-15'")
    assert {r["endpoint"] for r in ep} <= {"/v1/search", "/v1/items/{id}", "/v1/items",
                                           "/v1/reports/{id}", "/v1/export"}  # fmt: skip
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in ep)
    quota = await db.fetch("SELECT * FROM tier_quota_use WHERE date = '2026-10-15'")
    assert {r["tier"] for r in quota} == {"free", "pro"}
    active = await db.fetchval(
        "SELECT count(*) FROM daily_usage d JOIN users u ON u.id = d.user_id "
        "JOIN access_tiers t ON t.id = u.tier_id "
        "WHERE d.date = '2026-10-15' AND t.daily_quota IS NOT NULL"
    )
    assert 200 < sum(r["active_users"] for r in quota) == active  # enterprise has no quota


async def test_rebuild_shows_the_differences_and_applies_them_only_when_asked(database_url, db):
    s = Settings.from_env(database_url=database_url)
    keys = await make_users(db, 20)
    for month in (SEP, OCT):
        await fill_month(db, keys, month, per_key=150)
    # the first customer pays 1.00 a unit beyond the first 10 (hand-checkable)
    await AccountsService(db, cache=None, pepper=None).create_tier(
        name="unit", daily_quota=None, rate_limit_per_minute=600
    )
    await Billing(db).set_price(
        "unit", Price("USD", Decimal(0), 10, (Band(0, Decimal(1000)),)), since=date(2020, 1, 1)
    )
    await db.execute(
        "UPDATE user_tier_history SET tier_id = (SELECT id FROM access_tiers WHERE name = 'unit') "
        "WHERE user_id = $1",
        keys[0][0],
    )
    clean = run_cli(s, "usage", "rebuild", "--month", "2026-10")
    assert clean.returncode == 0, clean.stderr
    assert "0 user-days differ, 0 key/endpoint rows differ" in clean.stdout
    assert "nothing to change" in clean.stdout

    # September's counts drift (lost increments, a deleted histogram row) and
    # September is billed and made final with them
    user = keys[0][0]
    busiest = await db.fetchval(  # a day with at least 7 units and requests to lose
        "SELECT date FROM daily_usage WHERE user_id = $1 AND date < '2026-10-01' "
        "ORDER BY least(units, request_count - rejected_count) DESC LIMIT 1",
        user,
    )
    await db.execute(
        "UPDATE daily_usage SET units = units - 7, request_count = request_count - 7 "
        "WHERE user_id = $1 AND date = $2 AND units >= 7 AND request_count - rejected_count >= 7",
        user,
        busiest,
    )
    await db.execute(
        "DELETE FROM daily_endpoint_usage WHERE ctid = (SELECT ctid FROM daily_endpoint_usage "
        "WHERE date = '2026-09-11' LIMIT 1)"
    )
    billing = Billing(db)
    await billing.finalize(SEP, by="test", today=date(2026, 10, 5))
    stored = await db.fetch("SELECT * FROM daily_usage ORDER BY user_id, date")
    shown = run_cli(s, "usage", "rebuild", "--month", "2026-09")
    assert shown.returncode == 0, shown.stderr
    assert "1 user-days differ, 1 key/endpoint rows differ" in shown.stdout
    assert "nothing written" in shown.stdout
    assert await db.fetch("SELECT * FROM daily_usage ORDER BY user_id, date") == stored
    # the final invoice billed 7 units too few: they go on the next invoice
    assert "adjustment on the next invoice" in shown.stdout
    billed = {r["user_id"]: r for r in (await Rebuild(db).run(SEP, apply=False)).billed}
    assert list(billed) == [user]
    assert (billed[user]["status"], billed[user]["rebuilt_units"] - billed[user]["billed_units"]) == (
        "final", 7,
    )  # fmt: skip

    applied = run_cli(s, "usage", "rebuild", "--month", "2026-09", "--apply")
    assert applied.returncode == 0 and "applied" in applied.stdout
    again = await Rebuild(db).run(SEP, apply=False)
    assert again.clean
    final = await db.fetchrow("SELECT * FROM invoices WHERE user_id = $1 AND month = $2", user, SEP)
    assert final["status"] == "final"
    # the correction reaches the next invoice as an adjustment, and the final one stays
    await billing.bill(OCT, users=[user])
    adj = await db.fetchrow(
        "SELECT l.units_delta, l.amount FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id "
        "WHERE i.user_id = $1 AND i.month = $2 AND l.kind = 'adjustment'",
        user,
        OCT,
    )
    # 7 more units than billed, beyond the included 10: 7 x 1.00
    assert adj is not None and (adj["units_delta"], adj["amount"]) == (7, Decimal("7.00"))
    assert await db.fetchrow("SELECT * FROM invoices WHERE id = $1", final["id"]) == final


async def test_rebuild_refuses_a_month_whose_raw_events_are_gone(database_url, db):
    s = Settings.from_env(database_url=database_url)
    out = run_cli(s, "usage", "rebuild", "--month", "2019-01")
    assert out.returncode == 2 and "not kept" in out.stderr
    bad = run_cli(s, "usage", "rebuild", "--month", "2019-1")
    assert bad.returncode == 2 and "not a month" in bad.stderr
