"""Synthetic history for tests and benchmarks: users, keys and months of raw
usage written straight into ``usage_logs`` by SQL (millions of rows in a
minute), then the daily tables computed from it the way ``metering usage
rebuild`` does (:mod:`metering.usage.rebuild`). Never for production data.
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg

from metering.billing.drafts import next_month
from metering.usage.rebuild import Rebuild

ENDPOINTS = ("/v1/search", "/v1/items/{id}", "/v1/items", "/v1/reports/{id}", "/v1/export")
USERS_SQL = """
WITH u AS (
    INSERT INTO users (email, tier_id, created_at)
    SELECT $1 || '-' || i || '@example.com',
           (SELECT id FROM access_tiers WHERE name = (ARRAY['free', 'pro', 'pro', 'enterprise'])[1 + i % 4]),
           '2020-01-01'
    FROM generate_series(1, $2) AS i
    RETURNING id
)
INSERT INTO api_keys (user_id, name, prefix, key_hash)
SELECT u.id, 'key ' || k, 'mk_test_' || substr(md5(random()::text), 1, 16),
       md5(random()::text) || md5(random()::text)
FROM u CROSS JOIN generate_series(1, 2) AS k
RETURNING user_id, id
"""
# Per user and month: rows_per_month events at random times, on five
# endpoints with log-normal latencies of their own, 2 % server errors, 4 %
# refused (rate limited), 1-3 units each.
EVENTS_SQL = """
INSERT INTO usage_logs (event_id, created_at, user_id, api_key_id, endpoint, method,
                        status_code, response_time_ms, client_ip, bytes_out, units, rejected,
                        request_count)
SELECT gen_random_uuid(),
       $3::timestamptz + random() * ($4::timestamptz - $3::timestamptz),
       k.user_id, k.key_id,
       ($5::text[])[1 + e.n],
       'GET',
       CASE WHEN r.x < 0.04 THEN 429 WHEN r.x < 0.06 THEN 500 ELSE 200 END,
       round((exp(ln(5 + 40 * e.n) + 0.6 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())))::numeric, 3),
       ('198.51.100.' || (1 + abs(hashtext(k.user_id::text)) % 200))::inet,
       200 + (random() * 5000)::int,
       1 + e.n % 3,
       CASE WHEN r.x < 0.04 THEN 'rate_limited' END,
       1
FROM unnest($1::uuid[], $2::uuid[]) AS k (user_id, key_id)
CROSS JOIN generate_series(1, $6) AS g
CROSS JOIN LATERAL (SELECT floor(random() * 5)::int AS n, g AS salt, k.key_id AS per_key) AS e
CROSS JOIN LATERAL (SELECT random() AS x, g AS salt, k.key_id AS per_key) AS r
"""


async def make_users(
    conn: asyncpg.Connection, n: int, tag: str = "synthetic"
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``n`` users with two keys each; their (user, key) pairs."""
    rows = await conn.fetch(USERS_SQL, tag, n)
    return [(r["user_id"], r["id"]) for r in rows]


async def fill_month(
    conn: asyncpg.Connection, keys: list[tuple[uuid.UUID, uuid.UUID]], month: date, per_key: int
) -> None:
    """``per_key`` raw events for each (user, key) over ``month``, then its daily tables."""
    await conn.execute("SELECT ensure_usage_logs_partition($1)", month)
    users = [u for u, _ in keys]
    ids = [k for _, k in keys]
    await conn.execute(EVENTS_SQL, users, ids, month, next_month(month), list(ENDPOINTS), per_key)
    await Rebuild(conn).run(month, apply=True)
