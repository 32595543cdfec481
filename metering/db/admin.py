"""Creating and dropping whole databases (tests, benchmarks, tooling)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def database_url(base_url: str, name: str) -> str:
    """``base_url`` with its database name replaced by ``name``."""
    return urlunsplit(urlsplit(base_url)._replace(path="/" + name))


async def drop_database(admin_url: str, name: str, *, attempts: int = 40) -> None:
    """``DROP DATABASE ... WITH (FORCE)``, retried for a few seconds.

    An autovacuum worker is a superuser process that a non-superuser role
    may not terminate, so FORCE can fail while one is busy in the database.
    """
    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        for attempt in range(attempts):
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await admin.close()
