"""Migrations applied to an empty database, re-run, run concurrently, guarded."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from metering.db.lifecycle import maintain
from metering.db.migrate import SQL_DIR, migrate
from metering.db.partitions import month_partition
from metering.errors import MigrationError
from tests.integration.conftest import BASE, db_url, drop_database


@pytest.fixture
async def empty_db(services):
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(BASE.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield db_url(name)
    await drop_database(name)


# Written out by hand, not read with load() (the code under test): a new
# migration file must be added here on purpose.
MIGRATIONS = [
    (1, "core"),
    (2, "usage"),
    (3, "edge"),
    (4, "throttled"),
    (5, "pipeline_hardening"),
    (6, "key_versions"),
    (7, "rejected"),
    (8, "limit_scope"),
    (9, "summaries"),
    (10, "served_not_refused"),
    (11, "anomalies"),
    (12, "billing"),
    (13, "usage_notices"),
    (14, "analytics"),
]


async def test_migrations_build_the_schema_and_rerun_as_noop(empty_db):
    conn = await asyncpg.connect(empty_db)
    try:
        applied = await migrate(conn)
        assert [(m.version, m.name) for m in applied] == MIGRATIONS
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        assert [tuple(r) for r in recorded] == MIGRATIONS
        assert await migrate(conn) == []
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {
            "access_tiers",
            "users",
            "api_keys",
            "usage_logs",
            "daily_usage",
            "schema_migrations",
        } <= tables
        tiers = await conn.fetch(
            "SELECT name, daily_quota, rate_limit_per_minute FROM access_tiers ORDER BY id"
        )
        assert [tuple(r) for r in tiers] == [
            ("free", 1000, 10),
            ("pro", 100000, 100),
            ("enterprise", None, 1000),
        ]
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert {
            "daily_usage_pkey",
            "usage_logs_user_id_created_at_idx",
            "api_keys_key_hash_key",
        } <= indexes
        # usage_logs is partitioned by month, with the current month present
        assert (
            await conn.fetchval(
                "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'usage_logs'::regclass"
            )
            == "r"
        )
        now = datetime.now(UTC)
        assert await conn.fetchval("SELECT to_regclass($1)", month_partition(now).name)
        ahead = month_partition(month_partition(now).end + timedelta(days=40))
        assert await conn.fetchval("SELECT to_regclass($1)", ahead.name)
    finally:
        await conn.close()


async def test_concurrent_migrate_runs_apply_each_file_once(empty_db):
    conns = [await asyncpg.connect(empty_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(MIGRATIONS)]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)
    finally:
        for c in conns:
            await c.close()


async def test_an_edited_migration_is_refused(empty_db, tmp_path):
    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, folder)
        first = sorted(folder.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- sneaky edit\n")
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await migrate(conn, folder)
    finally:
        await conn.close()


async def test_a_failing_migration_is_rolled_back_and_reported(empty_db, tmp_path):
    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    (folder / "9999_broken.sql").write_text("CREATE TABLE ok_table (id int); SELECT 1/0;")
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(MigrationError, match="9999_broken failed"):
            await migrate(conn, folder)
        assert await conn.fetchval("SELECT to_regclass('ok_table')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") < 9999
    finally:
        await conn.close()


async def test_seed_functions_and_partition_maintenance(db):
    user = uuid.uuid4()
    # One transaction: now() and so "today" stay put even if 00:00 UTC passes.
    async with db.transaction():
        await db.execute(
            "INSERT INTO daily_usage (user_id, date, request_count, rejected_count)"
            " VALUES ($1, (now() AT TIME ZONE 'UTC')::date, 1030, 30)",
            user,
        )
        # served requests only: the 30 the edge refused do not count
        assert await db.fetchval("SELECT check_quota_exceeded($1, 1000)", user) is True
        assert await db.fetchval("SELECT check_quota_exceeded($1, 1001)", user) is False
        assert await db.fetchval("SELECT check_quota_exceeded($1, NULL)", user) is False
        assert (
            await db.fetchval(
                "SELECT quota_used_pct FROM daily_usage_report WHERE user_id = $1", user
            )
            is None
        )  # no tier for this bare user
    now = datetime.now(UTC)
    for seconds in (10, 30, 500):
        await db.execute(
            "INSERT INTO usage_logs (event_id, created_at, user_id, endpoint, method, status_code,"
            " response_time_ms, client_ip) VALUES ($1, $2, $3, '/x', 'GET', 200, 1, '127.0.0.1')",
            uuid.uuid4(),
            now - timedelta(seconds=seconds),
            user,
        )
    await db.execute(  # refused by the edge: recorded, not counted
        "INSERT INTO usage_logs (event_id, created_at, user_id, endpoint, method, status_code,"
        " response_time_ms, client_ip, rejected, request_count)"
        " VALUES ($1, $2, $3, '/x', 'GET', 403, 1, '127.0.0.1', 'forbidden_ip', 25)",
        uuid.uuid4(),
        now - timedelta(seconds=5),
        user,
    )
    assert await db.fetchval("SELECT get_rate_limit($1, 1)", user) == 2
    assert await db.fetchval("SELECT get_rate_limit($1, 60)", user) == 3


async def partitions(db) -> set[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_logs'::regclass"
    )
    return {r["relname"] for r in rows}


async def insert_row(db, at: datetime) -> None:
    await db.execute(
        "INSERT INTO usage_logs (event_id, created_at, endpoint, method, status_code,"
        " response_time_ms, client_ip) VALUES ($1, $2, '/x', 'GET', 200, 1, '127.0.0.1')",
        uuid.uuid4(),
        at,
    )


async def test_retention_drops_exactly_the_expired_months(db):
    now = datetime.now(UTC)
    # Nine months back, each with a row, plus the current and future months.
    months = []
    at = now
    for _ in range(9):
        at = month_partition(at).start - timedelta(days=1)
        months.append(month_partition(at))
        await db.fetchval("SELECT ensure_usage_logs_partition($1)", at)
        await insert_row(db, at)
    current = month_partition(now)
    future = month_partition(current.end + timedelta(days=1))
    await insert_row(db, now)
    await insert_row(db, future.start)
    before = await partitions(db)

    done = await maintain(db, months_ahead=2, retention_days=90)
    ensured, dropped = done.created, done.dropped
    # independently: a month goes when all of it is older than 90 days
    cutoff = datetime.now(UTC) - timedelta(days=90)
    expired = {m.name for m in months if m.end <= cutoff}
    assert 5 <= len(expired) <= 7  # the fixture really spans both sides
    assert set(dropped) == expired
    assert await partitions(db) == (before | set(ensured)) - expired
    assert {current.name, future.name} <= await partitions(db)
    kept_rows = await db.fetchval("SELECT count(*) FROM usage_logs")
    assert kept_rows == 2 + sum(1 for m in months if m.name not in expired)


async def test_the_retention_cutoff_is_exact(db):
    """A month is dropped when its end is at or before now() - retention, not a
    minute sooner: now() is fixed inside one transaction."""
    old = month_partition(datetime.now(UTC) - timedelta(days=400))
    await db.fetchval("SELECT ensure_usage_logs_partition($1)", old.start)
    async with db.transaction():
        age = await db.fetchval("SELECT now() - $1::timestamptz", old.end)
        kept = await db.fetch(
            "SELECT drop_expired_usage_logs_partitions($1::interval)", age + timedelta(minutes=1)
        )
        assert kept == [] and old.name in await partitions(db)
        gone = await db.fetch("SELECT drop_expired_usage_logs_partitions($1::interval)", age)
        assert [r[0] for r in gone] == [old.name]
        assert old.name not in await partitions(db)


async def test_0008_gives_existing_rotation_chains_their_lineage(empty_db, tmp_path):
    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    later = folder / "0008_limit_scope.sql"
    held_back = later.read_text()
    later.unlink()
    conn = await asyncpg.connect(empty_db)
    try:
        await migrate(conn, folder)  # 0001-0007
        uid = await conn.fetchval(
            "INSERT INTO users (email, tier_id) VALUES ('l@example.com', 1) RETURNING id"
        )
        ids = []
        for n in range(3):  # a chain: k0 <- k1 <- k2
            ids.append(
                await conn.fetchval(
                    "INSERT INTO api_keys (user_id, prefix, key_hash, rotated_from)"
                    " VALUES ($1, $2, $3, $4) RETURNING id",
                    uid,
                    f"mk_live_{n:08d}",
                    f"hash{n}",
                    ids[-1] if ids else None,
                )
            )
        later.write_text(held_back)
        await migrate(conn, folder)
        rows = await conn.fetch("SELECT id, lineage_id FROM api_keys ORDER BY prefix")
        assert [r["lineage_id"] for r in rows] == [None, ids[0], ids[0]]
    finally:
        await conn.close()
