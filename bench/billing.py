"""Billing and analyst benchmark: ``metering bill`` for many users over a
month of usage, and the ten analyst queries on millions of raw rows.

    python -m bench.billing [--users 10000] [--rows 10000000] [--skip-bill | --skip-analysts]

A fresh, migrated database gets ``--users`` users spread over the seeded
tiers (10 % of them change tier mid-month), a full month of ``daily_usage``
for each (some into a graduated overage band), and the month before it
billed and final, with late usage for 5 % of the users (so the month's run
also prices adjustments). Reported: the first run of the month (every
invoice new), a re-run (nothing changed: nothing written), and the run
that finalizes it, each timed as the service call from a client's view.
Target (#12): the first run under 60 s for 10,000 users.

Analysts: ``--rows`` raw events over three months (2,000 users with two keys
each, five endpoints, written by SQL, the daily tables rebuilt from them),
then each of the ten queries of docs/analysts.md for ``--samples`` users'
Octobers, warm (each run once before it is timed). Reported per query: the
median and the slowest time, and one EXPLAIN (ANALYZE) summary: partitions
read, indexes used. Target (#12): each under 100 ms.

Needs the stack (``metering stack up``); drops its database afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import date, timedelta

import asyncpg

from bench.pipeline import create_db, drop_db
from metering.billing.service import Billing
from metering.dev.analyst_queries import bound, nodes, ten_queries
from metering.dev.usage_data import fill_month, make_users
from metering.settings import Settings

MONTH = date(2026, 10, 1)  # 31 days
BEFORE = date(2026, 9, 1)
SETUP = """
INSERT INTO users (id, email, tier_id, created_at)
SELECT gen_random_uuid(), 'bench-' || i || '@example.com',
       (SELECT id FROM access_tiers WHERE name = (ARRAY['free', 'pro', 'pro', 'enterprise'])[1 + i % 4]),
       '2026-01-01'
FROM generate_series(1, $1) AS i;

-- 10 % move to enterprise on the 16th
INSERT INTO user_tier_history (user_id, effective_from, tier_id)
SELECT id, '2026-10-16', (SELECT id FROM access_tiers WHERE name = 'enterprise')
FROM users WHERE abs(hashtext(id::text)) % 10 = 0;

-- a month of usage before, and the month itself; some pro users far into overage
INSERT INTO daily_usage (user_id, date, request_count, rejected_count, units,
                         client_error_count, server_error_count, total_response_time_ms)
SELECT u.id, d::date, n + n / 50, n / 50, n, n / 100, n / 1000, n * 12.5
FROM users u
CROSS JOIN generate_series('2026-09-01'::date, '2026-10-31'::date, interval '1 day') AS d
CROSS JOIN LATERAL (SELECT (abs(hashtext(u.id::text || d::text)) % 200000)::bigint AS n) AS x;
"""
LATE = """
UPDATE daily_usage SET units = units + 1234, request_count = request_count + 1234
WHERE date = '2026-09-20' AND abs(hashtext(user_id::text)) % 20 = 1
"""


async def run(users: int) -> dict[str, float]:
    base = Settings.from_env()
    name = f"bench_billing_{uuid.uuid4().hex[:8]}"
    url = await create_db(base, name)
    try:
        conn = await asyncpg.connect(url, command_timeout=600)
        try:
            t = time.perf_counter()
            await conn.execute(SETUP.replace("$1", str(int(users))))
            await conn.execute("ANALYZE")
            print(f"setup: {users:,} users, {await conn.fetchval('SELECT count(*) FROM daily_usage'):,} "
                  f"daily_usage rows in {time.perf_counter() - t:.1f} s")  # fmt: skip
            billing = Billing(conn)
            await billing.finalize(BEFORE, by="bench", today=MONTH + timedelta(days=3))
            await conn.execute(LATE)
            out = {}
            for label, work in (
                ("first run", lambda: billing.bill(MONTH)),
                ("re-run", lambda: billing.bill(MONTH)),
                ("finalize", lambda: billing.finalize(MONTH, by="bench", today=date(2026, 11, 5))),
            ):
                t = time.perf_counter()
                result = await work()
                took = time.perf_counter() - t
                out[label] = took
                totals = ", ".join(f"{v:,} {c}" for c, v in result.totals.items())
                print(f"{label:>9}: {took:6.2f} s  {result.invoices:,} invoices, {result.changed:,} "
                      f"changed, {result.adjustments:,} adjustments; {totals}")  # fmt: skip
            return out
        finally:
            await conn.close()
    finally:
        await drop_db(base, name)


async def analysts(rows: int, samples: int) -> dict[str, list[float]]:
    base = Settings.from_env()
    name = f"bench_analysts_{uuid.uuid4().hex[:8]}"
    url = await create_db(base, name)
    try:
        conn = await asyncpg.connect(url, command_timeout=3600)
        try:
            t = time.perf_counter()
            keys = await make_users(conn, 2_000, "bench")
            per_key = max(1, rows // (3 * len(keys)))
            for month in (date(2026, 9, 1), MONTH, date(2026, 11, 1)):
                await fill_month(conn, keys, month, per_key=per_key)
            await conn.execute("VACUUM ANALYZE")
            total = await conn.fetchval("SELECT count(*) FROM usage_logs")
            print(f"setup: {total:,} usage_logs rows over 3 months, 2,000 users, "
                  f"{time.perf_counter() - t:.0f} s")  # fmt: skip
            users = [u for u, _ in keys[:: max(1, len(keys) // samples)]][:samples]
            await Billing(conn).bill(MONTH, users=users)
            times: dict[str, list[float]] = {}
            for title, sql in ten_queries():
                q = bound(sql)
                times[title] = []
                for user in users:
                    await conn.fetch(q, user, MONTH)  # warm
                    t = time.perf_counter()
                    await conn.fetch(q, user, MONTH)
                    times[title].append((time.perf_counter() - t) * 1000)
                plan = json.loads(await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {q}", users[0], MONTH))  # fmt: skip
                tree = nodes(plan[0]["Plan"])
                parts = sorted({n["Relation Name"] for n in tree
                                if n.get("Relation Name", "").startswith("usage_logs")})  # fmt: skip
                indexes = sorted({n["Index Name"] for n in tree if "Index Name" in n})
                ms = sorted(times[title])
                print(f"{title[:52]:<52} median {statistics.median(ms):6.1f} ms, max {ms[-1]:6.1f} ms;"
                      f" plan {plan[0]['Execution Time']:.1f} ms, partitions {parts or '-'},"
                      f" indexes {indexes}")  # fmt: skip
            return times
        finally:
            await conn.close()
    finally:
        await drop_db(base, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.billing", description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--skip-bill", action="store_true")
    ap.add_argument("--skip-analysts", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_bill:
        result = asyncio.run(run(args.users))
        ok = result["first run"] < 60
        print(f"target: first run < 60 s for {args.users:,} users: {'met' if ok else 'NOT met'}")
    if not args.skip_analysts:
        times = asyncio.run(analysts(args.rows, args.samples))
        worst = max(max(v) for v in times.values())
        print(f"target: each analyst query < 100 ms (warm): {'met' if worst < 100 else 'NOT met'}"
              f" (slowest {worst:.1f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
