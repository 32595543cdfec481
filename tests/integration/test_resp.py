"""The request path's lean Redis connection, against the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.asyncio.connection import Connection
from redis.exceptions import AuthenticationError, DataError, NoScriptError, ResponseError

from metering.redis.resp import RespChannel, pack, supported
from metering.redis.scripts import CoalescingScript
from metering.settings import Settings

BASE = Settings.from_env()
# The CoalescingScript contract: ARGV is the number of calls, then each call's
# arguments; the reply is one result per call. Here: "<argument>:<calls in batch>".
ECHO_BATCH = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do out[i] = ARGV[i + 1] .. ':' .. n end
return out
"""


@pytest.fixture
async def channel(redis_client):
    ch = RespChannel(redis_client)
    yield ch
    await ch.aclose()


def test_pack_is_resp_bulk_strings():
    assert (
        pack(["SET", b"k\r\n", 12, 1.5])
        == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    )
    for bad in (None, True, Decimal("1.5"), "lone \ud800 surrogate"):
        with pytest.raises(DataError):
            pack(["SET", bad])


async def test_pipelined_replies_reach_their_callers(channel, redis_prefix):
    key = f"{redis_prefix}:n"
    replies = await asyncio.gather(*(channel.execute("INCR", key) for _ in range(200)))
    assert replies == list(range(1, 201))  # in order: each caller got its own reply
    value = b"binary\r\n\x00value"
    assert await channel.execute("SET", f"{redis_prefix}:b", value) == b"OK"
    assert await channel.execute("GET", f"{redis_prefix}:b") == value


async def test_an_argument_redis_cannot_take_fails_alone_and_replies_stay_in_step(
    channel, redis_prefix
):
    await channel.execute("SET", f"{redis_prefix}:a", "first")
    for bad in ("lone \ud800", Decimal("1.5"), True):
        with pytest.raises(DataError):
            await channel.execute("SET", f"{redis_prefix}:b", bad)
    # every later caller still gets its own reply (no reply slot was left behind)
    assert await channel.execute("GET", f"{redis_prefix}:a") == b"first"
    assert await channel.execute("EXISTS", f"{redis_prefix}:b") == 0


async def test_error_replies_raise_and_the_connection_stays_usable(channel):
    with pytest.raises(ResponseError, match="unknown command"):
        await channel.execute("NOSUCHCOMMAND")
    with pytest.raises(NoScriptError):
        await channel.execute("EVALSHA", "0" * 40, 0)
    assert await channel.execute("PING") == b"PONG"


async def test_a_late_reply_fails_the_call_and_the_next_one_reconnects(redis_prefix):
    client = aioredis.from_url(BASE.redis_url, socket_timeout=0.2)
    ch = RespChannel(client)
    try:
        with pytest.raises(TimeoutError):
            await ch.execute("BLPOP", f"{redis_prefix}:never", 2)
        # The late BLPOP reply must never answer this call: its connection is gone.
        await client.rpush(f"{redis_prefix}:never", "x")
        assert await ch.execute("ECHO", "mine") == b"mine"
    finally:
        await ch.aclose()
        await client.aclose()


async def test_a_killed_connection_fails_in_flight_calls_then_reconnects(channel, redis_client):
    conn_id = await channel.execute("CLIENT", "ID")
    blocked = asyncio.ensure_future(channel.execute("BLPOP", f"resp-test-{uuid.uuid4()}", 5))
    await asyncio.sleep(0.1)
    await redis_client.client_kill_filter(_id=conn_id)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(blocked, 2)
    assert await channel.execute("PING") == b"PONG"
    assert await channel.execute("CLIENT", "ID") != conn_id


async def test_an_unreachable_redis_is_not_dialled_on_every_call():
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5)
    ch = RespChannel(client)
    try:
        with pytest.raises(ConnectionRefusedError):
            await ch.execute("PING")
        with pytest.raises(ConnectionError, match="next connect attempt in"):
            await ch.execute("PING")  # fails at once: no connect inside the back-off
        await asyncio.sleep(0.15)
        with pytest.raises(ConnectionRefusedError):  # dialled again after it
            await ch.execute("PING")
        with pytest.raises(ConnectionError, match=r"next connect attempt in 0\.[12]"):
            await ch.execute("PING")  # and the back-off doubled
    finally:
        await ch.aclose()
        await client.aclose()


async def test_credentials_and_database_come_from_the_client(private_redis, redis_prefix):
    redis_client = aioredis.from_url(private_redis)
    user, password = f"resp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    host, port = private_redis.split("//")[1].split("/")[0].split(":")
    good = aioredis.from_url(f"redis://{user}:{password}@{host}:{port}/5")
    bad = aioredis.from_url(f"redis://{user}:wrong@{host}:{port}/5")
    ch, bad_ch = RespChannel(good), RespChannel(bad)
    db5 = aioredis.from_url(f"redis://{host}:{port}/5")
    try:
        assert await ch.execute("SET", f"{redis_prefix}:in5", "yes") == b"OK"
        assert await db5.get(f"{redis_prefix}:in5") == b"yes"
        assert await redis_client.get(f"{redis_prefix}:in5") is None  # not database 0
        with pytest.raises(AuthenticationError):
            await bad_ch.execute("PING")
    finally:
        await db5.delete(f"{redis_prefix}:in5")
        await redis_client.execute_command("ACL", "DELUSER", user)
        for c in (ch, bad_ch):
            await c.aclose()
        for r in (good, bad, db5, redis_client):
            await r.aclose()


def test_works_on_uvloop(services, redis_prefix):
    """uvicorn runs edges on uvloop, whose transports are not asyncio's classes."""

    async def go() -> tuple[object, list[object], int]:
        client = aioredis.from_url(BASE.redis_url)
        script = CoalescingScript(client, ECHO_BATCH)
        try:
            one = await script(["a"])
            many = await asyncio.gather(*(script([str(i)]) for i in range(5)))
            return one, many, script.round_trips
        finally:
            await script.aclose()
            await client.aclose()

    one, many, round_trips = uvloop.run(go())
    assert one == b"a:1"
    # the first of five goes out alone (nothing in flight), the other four together
    assert many == [b"0:1", b"1:4", b"2:4", b"3:4", b"4:4"]
    assert round_trips == 3


async def test_clients_it_cannot_stand_in_for_go_through_redis_py(redis_client):
    class Custom(Connection):
        pass

    odd = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool.from_url(BASE.redis_url, connection_class=Custom)
    )
    assert supported(redis_client) and not supported(odd)
    script = CoalescingScript(odd, ECHO_BATCH)
    try:
        assert await script(["x"]) == b"x:1"
    finally:
        await script.aclose()
        await odd.aclose()
        await odd.connection_pool.disconnect()


@pytest.mark.parametrize("fallback", [False, True], ids=["resp-channel", "redis-py"])
async def test_a_script_cache_flushed_by_a_restart_is_reloaded(private_redis, fallback):
    class Custom(Connection):
        pass

    redis_client = aioredis.from_url(private_redis)  # SCRIPT FLUSH is server-wide
    client = (
        aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(private_redis, connection_class=Custom)
        )
        if fallback
        else redis_client
    )
    script = CoalescingScript(client, ECHO_BATCH)
    try:
        assert await script(["a"]) == b"a:1"
        await redis_client.script_flush()  # what a Redis restart does to loaded scripts
        before = script.round_trips
        assert await script(["b"]) == b"b:1"
        assert script.round_trips - before == 2  # NOSCRIPT, then the reloaded script
    finally:
        await script.aclose()
        if fallback:
            await client.aclose()
            await client.connection_pool.disconnect()
        await redis_client.aclose()


class MisbehavingPeer:
    """A TCP peer that answers RESP badly on purpose (protocol-fault injection:
    real Redis never does this, which is why these paths need a peer that does).
    ``mode`` decides the reply to each command of a connection's first command;
    later connections answer +PONG properly."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0

    async def start(self) -> MisbehavingPeer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            while await reader.read(4096):
                if first and self.mode == "garbage":
                    writer.write(b"?this is not RESP\r\n")
                elif first and self.mode == "extra":
                    writer.write(b"+PONG\r\n+NOBODY-ASKED\r\n")
                else:
                    writer.write(b"+PONG\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("mode", "first_answer"),
    [("garbage", "protocol error"), ("extra", b"PONG")],
)
async def test_a_peer_out_of_step_is_dropped_and_the_next_call_reconnects(mode, first_answer):
    peer = await MisbehavingPeer(mode).start()
    client = aioredis.from_url(f"redis://127.0.0.1:{peer.port}/0", socket_timeout=2)
    ch = RespChannel(client)
    try:
        if isinstance(first_answer, bytes):
            # the reply is delivered; the unsolicited one after it ends the connection
            assert await ch.execute("PING") == first_answer
        else:
            with pytest.raises(ConnectionError, match=first_answer):
                await ch.execute("PING")
        await asyncio.sleep(0.05)
        assert await ch.execute("PING") == b"PONG"  # on a new connection, never out of step
        assert peer.connections == 2
    finally:
        await ch.aclose()
        await client.aclose()
        await peer.close()


async def test_connect_back_off_doubles_to_its_cap_and_resets_after_a_success():
    peer = await MisbehavingPeer("fine").start()
    closed = free_closed_port()
    client = aioredis.from_url(f"redis://127.0.0.1:{closed}/0", socket_timeout=1)
    ch = RespChannel(client)
    try:
        seen = []
        for _ in range(7):
            with pytest.raises(OSError):
                await ch._connect_or_back_off()
            seen.append(ch._backoff)
        assert seen == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        ch._conn.port = peer.port  # the server is back
        proto = await ch._connect_or_back_off()
        assert ch._backoff == 0.0
        proto.transport.close()
    finally:
        await ch.aclose()
        await client.aclose()
        await peer.close()


def free_closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on return: nothing listens there
