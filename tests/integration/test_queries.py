"""Every named query prepares against a migrated database: a typo in a
``.sql`` file, or a column a migration renamed, fails here."""

from __future__ import annotations

import asyncpg
import pytest

from metering.db.queries import QUERIES, parse
from metering.usage.store import CREATE_STAGE


def test_there_are_queries_to_check():
    # a loader that found nothing would make the test below pass vacuously
    assert len(QUERIES) >= 20
    assert {"lookup_identity", "revoke_key", "bump_user_keys"} <= set(QUERIES)


async def test_every_named_query_prepares(db: asyncpg.Connection):
    await db.execute(CREATE_STAGE)  # the usage queries read the session's staging table
    for name in ("rebuild_create_daily", "rebuild_create_endpoint"):  # and the rebuild's
        await db.execute(QUERIES[name])
    failures = {}
    for name, sql in QUERIES.items():
        try:
            await db.prepare(sql)
        except asyncpg.PostgresError as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
    assert failures == {}


def test_parse_refuses_what_would_hide_a_query():
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(ValueError, match="empty"):
        parse("-- name: a\n-- only a comment\n-- name: b\nSELECT 1;")
    with pytest.raises(ValueError, match="before the first"):
        parse("SELECT 0;\n-- name: a\nSELECT 1;")
    assert parse("-- header\n\n-- name: a\n-- what it does\nSELECT 1;\n") == {
        "a": "-- what it does\nSELECT 1"
    }
