"""The raw log's partitions over time: months created ahead across a year
boundary, expired months archived (every row, checked) and dropped while the
daily tables, histograms and invoices stay, and no default partition."""

from __future__ import annotations

import csv
import gzip
import io
import json
from datetime import UTC, date, datetime

import asyncpg
import pytest

from metering.billing.service import Billing
from metering.db.lifecycle import maintain
from metering.dev.usage_data import fill_month, make_users
from metering.settings import Settings
from tests.integration.test_cli import run_cli


async def partitions(db) -> set[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'usage_logs'::regclass"
    )
    return {r[0] for r in rows}


async def test_months_ahead_and_retention_across_a_year_boundary(db):
    done = await maintain(db, months_ahead=2, retention_days=90,
                          now=datetime(2026, 12, 20, 12, tzinfo=UTC))  # fmt: skip
    assert done.created == ["usage_logs_y2026m11", "usage_logs_y2026m12", "usage_logs_y2027m01",
                            "usage_logs_y2027m02"]  # fmt: skip
    assert set(done.created) <= await partitions(db) and done.default_partition is None
    # 10 April 2027 - 90 days = 10 January: December is over by then, January is not
    later = await maintain(db, months_ahead=2, retention_days=90,
                           now=datetime(2027, 4, 10, tzinfo=UTC))  # fmt: skip
    assert "usage_logs_y2026m11" in later.dropped and "usage_logs_y2026m12" in later.dropped
    assert "usage_logs_y2027m01" not in later.dropped
    assert {"usage_logs_y2027m01", "usage_logs_y2027m06"} <= await partitions(db)
    assert not {"usage_logs_y2026m11", "usage_logs_y2026m12"} & await partitions(db)


async def test_expired_months_are_archived_whole_then_dropped_and_the_rest_stays(db, tmp_path):
    keys = await make_users(db, 30)
    months = [date(2026, m, 1) for m in (5, 6, 7, 8, 9)]
    for month in months:
        await fill_month(db, keys, month, per_key=20)
    user = keys[0][0]
    await Billing(db).finalize(date(2026, 6, 1), by="test", today=date(2026, 7, 4))
    before = {}
    for m in months:
        name = f"usage_logs_y{m:%Y}m{m:%m}"
        before[name] = {r[0] for r in await db.fetch(f'SELECT event_id::text FROM "{name}"')}
    daily = await db.fetchval("SELECT count(*) FROM daily_usage")
    detail = await db.fetch(
        "SELECT * FROM daily_endpoint_usage ORDER BY user_id, date, endpoint, api_key_id"
    )
    invoices = await db.fetch("SELECT * FROM invoices ORDER BY id")

    # 6 December - 90 days = 7 September: May to August are expired, September is not
    done = await maintain(db, months_ahead=2, retention_days=90, archive_dir=tmp_path,
                          now=datetime(2026, 12, 6, tzinfo=UTC))  # fmt: skip
    expired = [f"usage_logs_y2026m{m:02d}" for m in (5, 6, 7, 8)]
    assert done.dropped == expired
    assert [a.partition for a in done.archived] == expired
    assert not set(expired) & await partitions(db)
    assert "usage_logs_y2026m09" in await partitions(db)
    for a in done.archived:
        with gzip.open(a.path, "rt", newline="") as f:
            rows = list(csv.DictReader(io.StringIO(f.read())))
        assert {r["event_id"] for r in rows} == before[a.partition]
        assert len(rows) == a.rows == len(before[a.partition]) == 1_200
        manifest = json.loads((tmp_path / f"{a.partition}.json").read_text())
        assert manifest["rows"] == a.rows and manifest["columns"][:2] == ["event_id", "created_at"]
    # what billing and analysts keep
    assert await db.fetchval("SELECT count(*) FROM daily_usage") == daily
    assert (
        await db.fetch(
            "SELECT * FROM daily_endpoint_usage ORDER BY user_id, date, endpoint, api_key_id"
        )
        == detail
    )
    assert await db.fetch("SELECT * FROM invoices ORDER BY id") == invoices
    p95 = await db.fetchval(
        "SELECT latency_quantile(hist_concat(latency_buckets), hist_concat(latency_counts), 0.95) "
        "FROM daily_endpoint_usage WHERE user_id = $1 AND date < '2026-09-01'",
        user,
    )
    assert p95 > 0  # percentiles of months whose raw rows are gone


async def test_an_archive_that_cannot_be_written_keeps_the_partition(db, tmp_path):
    keys = await make_users(db, 3)
    await fill_month(db, keys, date(2026, 5, 1), per_key=5)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the archive folder should be")
    with pytest.raises(OSError):
        await maintain(db, months_ahead=0, retention_days=90, archive_dir=blocked,
                       now=datetime(2026, 12, 6, tzinfo=UTC))  # fmt: skip
    assert "usage_logs_y2026m05" in await partitions(db)
    assert await db.fetchval('SELECT count(*) FROM "usage_logs_y2026m05"') == 30


async def test_no_row_lands_outside_its_month(db):
    parts = await db.fetch("SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                           "JOIN pg_class c ON c.oid = i.inhrelid "
                           "WHERE i.inhparent = 'usage_logs'::regclass")  # fmt: skip
    assert parts and all("DEFAULT" not in r[0] for r in parts)
    with pytest.raises(asyncpg.CheckViolationError, match="no partition"):
        await db.execute(
            "INSERT INTO usage_logs (event_id, created_at, endpoint, method, status_code, "
            "response_time_ms, client_ip) VALUES (gen_random_uuid(), '1999-01-01', '/', 'GET', "
            "200, 1, '127.0.0.1')"
        )


async def test_db_maintain_archives_with_the_archive_setting(database_url, db, tmp_path):
    keys = await make_users(db, 2)
    await fill_month(db, keys, date(2019, 1, 1), per_key=3)
    s = Settings.from_env(database_url=database_url, archive_dir=str(tmp_path / "archive"))
    out = run_cli(s, "db", "maintain")
    assert out.returncode == 0, out.stderr
    assert "archived usage_logs_y2019m01: 12 rows" in out.stdout
    assert "usage_logs_y2019m01" not in await partitions(db)
    assert (tmp_path / "archive" / "usage_logs_y2019m01.csv.gz").exists()


async def test_an_archive_is_never_overwritten(db, tmp_path):
    from metering.db.lifecycle import ArchiveError, archive

    keys = await make_users(db, 3)
    await fill_month(db, keys, date(2026, 5, 1), per_key=5)
    name, now = "usage_logs_y2026m05", datetime(2026, 12, 6, tzinfo=UTC)

    class Stop(Exception):
        pass

    # a run that wrote the archive and stopped before its DROP committed
    with pytest.raises(Stop):
        async with db.transaction():
            first = await archive(db, name, tmp_path)
            raise Stop
    assert name in await partitions(db)
    done = await maintain(db, months_ahead=0, retention_days=90, archive_dir=tmp_path, now=now)
    assert done.dropped == [name] and done.archived[0].sha256 == first.sha256  # reused, whole

    # a different file under the partition's name is never replaced
    await fill_month(db, keys, date(2026, 4, 1), per_key=5)
    other = tmp_path / "usage_logs_y2026m04.csv.gz"
    other.write_bytes(gzip.compress(b"event_id\nsomething else\n"))
    with pytest.raises(ArchiveError, match="move it away"):
        await maintain(db, months_ahead=0, retention_days=90, archive_dir=tmp_path, now=now)
    assert "usage_logs_y2026m04" in await partitions(db)
    assert gzip.decompress(other.read_bytes()) == b"event_id\nsomething else\n"
