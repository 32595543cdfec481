"""Opening connections and classifying asyncpg errors.

A failure is either the **row's fault** (the same statement with other data
would have worked: SQLSTATE class 22 *data exception*, class 23 *integrity
constraint violation*, or a value asyncpg itself cannot encode) or an
**outage** (it would fail for any row: the link, the server, its state or
its configuration). Rows at fault become dead letters; an outage pauses the
pipeline, which retries on a new connection until it heals. Read-only
transactions (25006, what a demoted primary answers), statement timeouts
(57014), permission errors (42501), I/O errors (58030), a missing table
(42P01) and everything else not in classes 22/23 are outages: dead-lettering
valid events because the database is unwell would lose them from billing.
(The pipeline adds one more guard: a batch whose every event is refused
with the same error is treated as an outage too; see metering.usage.pipeline.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import asyncpg

from metering.errors import ServiceUnavailable

log = logging.getLogger(__name__)

# SQLSTATE classes that blame the data of a row, not the database.
_ROW_FAULT_CLASSES = ("22", "23")

# TCP keepalive for PostgreSQL connections: an idle link whose peer vanished
# is noticed after about IDLE + INTERVAL * COUNT seconds instead of never.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class RowDataError(Exception):
    """A value in the batch could not be encoded for PostgreSQL (client side:
    asyncpg's COPY raises plain TypeError / ValueError / OverflowError)."""


def is_row_fault(exc: BaseException) -> bool:
    """True when the database refused this row's data (other rows can still succeed)."""
    if isinstance(exc, RowDataError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(_ROW_FAULT_CLASSES)
    return False


def is_connection_error(exc: BaseException) -> bool:
    """True when the failure is about the server, the link or the database's state,
    not the data: retrying (on a new connection) can succeed once it heals."""
    if isinstance(exc, ServiceUnavailable):
        return True
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        # The client lost the connection or track of the protocol (e.g. the
        # server killed the backend mid-statement): the server rolled back
        # its transaction, a new connection can retry safely.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return not is_row_fault(exc)
    return False


def _set_keepalive(conn: asyncpg.Connection) -> None:
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a unix socket has no peer to lose
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            # unacknowledged data for this long fails the socket (Linux)
            (
                "TCP_USER_TIMEOUT",
                (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT) * 1000,
            ),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError as exc:  # pragma: no cover - platform without these options
        log.debug("could not set TCP keepalive on the PostgreSQL connection: %s", exc)


async def connect(
    dsn: str, *, timeout: float = 10.0, command_timeout: float | None = None
) -> asyncpg.Connection:
    """Open one connection with UTC session time zone; translate failures.

    ``command_timeout`` bounds every statement: the client gives up (and the
    caller treats it as an outage) instead of waiting forever on a silent
    peer, and the server's ``statement_timeout`` is set a little below it so
    a slow statement is cancelled server-side first. TCP keepalive is on.
    """
    server_settings = {"timezone": "UTC", "application_name": "metering"}
    if command_timeout is not None:
        server_settings["statement_timeout"] = str(max(1, int(command_timeout * 1000 * 0.9)))
    try:
        conn = await asyncpg.connect(
            dsn,
            timeout=timeout,
            command_timeout=command_timeout,
            server_settings=server_settings,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    _set_keepalive(conn)
    return conn


def refusal_cause(exc: BaseException) -> tuple[object, ...]:
    """What a refusal blames: the same tuple for every row means the schema."""
    return (
        type(exc).__name__,
        getattr(exc, "sqlstate", None),
        getattr(exc, "table_name", None),
        getattr(exc, "column_name", None),
        getattr(exc, "constraint_name", None),
    )


def describe(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    text = str(exc) or type(exc).__name__
    return f"{state}: {text}" if state else f"{type(exc).__name__}: {text}"


@contextlib.asynccontextmanager
async def connection(db: asyncpg.Connection | asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection from ``db``: the connection itself, or one acquired from the pool."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db
