"""Opening connections and classifying asyncpg errors."""

from __future__ import annotations

import asyncio

import asyncpg

from metering.errors import ServiceUnavailable

# Errors after which the same statement can succeed on a new connection or later.
_RETRIABLE_SQLSTATE_CLASSES = ("08", "53", "57P")  # connection, resources, shutdown
_RETRIABLE_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization, deadlock, lock timeout


def is_connection_error(exc: BaseException) -> bool:
    """True when the failure is about the server or the link, not the data."""
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.InternalClientError):
        # The client lost track of the protocol, e.g. after the server killed
        # the backend mid-statement: the connection is unusable, the server
        # rolled back its transaction; a new connection can retry safely.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state in _RETRIABLE_SQLSTATES or state.startswith(_RETRIABLE_SQLSTATE_CLASSES)
    return False


async def connect(dsn: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """Open one connection with UTC session time zone; translate failures."""
    try:
        conn = await asyncpg.connect(
            dsn,
            timeout=timeout,
            server_settings={"timezone": "UTC", "application_name": "metering"},
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    return conn
