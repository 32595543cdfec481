"""A lean pipelined Redis connection for the request path.

redis-py's asyncio client spends ~56 µs of CPU per command here (connection
pool, locks, a StreamReader and several coroutine hops), which is most of
what a request pays for its one Redis round trip. :class:`RespChannel`
speaks RESP2 over an :class:`asyncio.Protocol` and leaves parsing to
``hiredis`` (C): ~6 µs per command, replies matched to callers in order, any
number of commands in flight on one connection. Measured in
docs/benchmarks.md; the reasons are in docs/decisions.md.

It is configured from an existing redis-py client (same host, port, TLS,
unix socket, credentials, database, timeouts), so there is one Redis URL to
get right. Errors are redis-py's and the standard library's, so callers
handle one set: :class:`redis.exceptions.ResponseError` (and
``NoScriptError``) for error replies, ``ConnectionError``/``TimeoutError``
(both ``OSError``) when the connection fails or a reply is late. A late
reply or a lost connection fails every command in flight and the next
command reconnects. A failed connect is not retried for a while (0.1 s,
doubling up to 2 s): meanwhile commands fail at once, so during an outage
requests get the edge's failure policy without waiting on a connect each.

Only what the hot path needs: commands in, replies out. Everything else
(pub/sub, transactions, cluster, sentinel) stays with redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (
    AuthenticationError,
    DataError,
    NoScriptError,
    RedisError,
    ResponseError,
)


def supported(redis: aioredis.Redis) -> bool:
    """Can a :class:`RespChannel` stand in for this client's connections?"""
    pool = getattr(redis, "connection_pool", None)
    cls = getattr(pool, "connection_class", None)
    return cls in (Connection, SSLConnection, UnixDomainSocketConnection)


def encode(a: Any) -> bytes:
    """One argument as Redis receives it; :class:`DataError` for what it cannot
    be (a bool, a Decimal, a str with a lone surrogate ...)."""
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        try:
            return a.encode()
        except UnicodeEncodeError as exc:
            raise DataError(f"cannot send a string that is not valid UTF-8: {exc}") from None
    if type(a) is int or type(a) is float:  # not bool, not subclasses with their own repr
        return repr(a).encode()
    raise DataError(f"cannot send {type(a).__name__} to Redis")


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (:class:`DataError` before
    anything is written when an argument cannot be sent)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = encode(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def _error(reply: ResponseError) -> RedisError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    return reply


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # the stream is unusable
                self.fail(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: out of step
                self.fail(ConnectionError("unexpected reply from Redis"))
                return
            fut = self.waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        self._fail_waiting(ConnectionError(f"connection to Redis lost: {self.lost}"))

    def send(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        """Write one command; its reply (or error) resolves the returned future."""
        assert self.transport is not None
        command = pack(args)  # first: a command that cannot be encoded fails alone
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.transport.write(command)
        return fut

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail every command in flight."""
        self.lost = exc
        self._fail_waiting(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, exc: BaseException) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)


class RespChannel:
    """One connection, commands pipelined on it, configured like ``redis``."""

    def __init__(self, redis: aioredis.Redis) -> None:
        if not supported(redis):
            raise ValueError("RespChannel supports plain TCP, TLS and unix-socket Redis only")
        self._conn = redis.connection_pool.make_connection()  # its settings; never connected
        self._timeout: float | None = self._conn.socket_timeout
        self._connect_timeout: float | None = self._conn.socket_connect_timeout or self._timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._retry_at = 0.0  # loop time before which no new connect is tried
        self._backoff = 0.0

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._connected()
        fut = proto.send(args)
        if self._timeout is None:
            return await fut
        timer = asyncio.get_running_loop().call_later(self._timeout, self._late, proto, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _late(self, proto: _Protocol, fut: asyncio.Future[Any]) -> None:
        # Replies come in order: once one is late, the ones behind it are
        # too, and a reply arriving after this would answer the wrong caller.
        if not fut.done():
            proto.fail(TimeoutError(f"no reply from Redis within {self._timeout}s"))

    async def _connected(self) -> _Protocol:
        if self._connecting is None:  # one connect attempt, shared by every caller
            wait = self._retry_at - asyncio.get_running_loop().time()
            if wait > 0:
                raise ConnectionError(f"Redis unreachable; next connect attempt in {wait:.2f}s")
            self._connecting = asyncio.ensure_future(self._connect_or_back_off())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect_or_back_off(self) -> _Protocol:
        try:
            proto = await self._connect()
        except (OSError, RedisError):
            self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
            self._retry_at = asyncio.get_running_loop().time() + self._backoff
            raise
        self._backoff = 0.0
        return proto

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        c = self._conn
        if isinstance(c, UnixDomainSocketConnection):
            opening = loop.create_unix_connection(_Protocol, c.path)
        else:
            ssl_context = c.ssl_context.get() if isinstance(c, SSLConnection) else None
            opening = loop.create_connection(_Protocol, c.host, c.port, ssl=ssl_context)
        async with asyncio.timeout(self._connect_timeout):
            _, proto = await opening
        try:
            handshake = []
            if c.password is not None:
                handshake.append(
                    ("AUTH", c.username, c.password) if c.username else ("AUTH", c.password)
                )
            if c.db:
                handshake.append(("SELECT", c.db))
            for command in handshake:
                async with asyncio.timeout(self._connect_timeout):
                    await proto.send(command)
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()
            raise
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        self._proto = proto
        return proto

    async def aclose(self) -> None:
        """Close the connection (commands in flight fail; a later command
        opens a new one). Idempotent."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
