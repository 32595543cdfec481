"""Redis Lua scripts, and running many calls of one in a single round trip.

:class:`CoalescingScript` gathers the calls made during one event-loop tick
while another call is in flight and sends them as one EVALSHA: with 64
concurrent requests that is two round trips instead of 64 (redis-py costs
~220 µs of client time per awaited command here, so per-call round trips cap
a process at a few thousand checks per second). The calls go over a
:class:`~metering.redis.resp.RespChannel` (a lean pipelined connection, ~6 µs of
CPU per command instead of redis-py's ~56 µs) when the client's connection
type allows, else through redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from metering.redis.resp import RespChannel, encode, supported


def load_source(name: str, *, with_gcra: bool = True) -> str:
    """The text of ``metering/lua/<name>.lua``, with the GCRA helpers in front."""
    lua = resources.files("metering.redis").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    return (lua.joinpath("gcra.lua").read_text() + "\n" + body) if with_gcra else body


class CoalescingScript:
    """Many callers of one script, as few round trips as the load allows.

    A call made while no call of this script is on the wire goes out at once
    (at low load that is every call: waiting for company would only add the
    time the event loop spends on other work to the request). A call made
    while one is in flight leads a batch instead: it gives the other tasks
    ready in this tick one chance to join, then sends all of them as one
    script call.
    """

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._source = source
        self._sha: str | None = None
        self._channel = RespChannel(redis) if supported(redis) else None
        self._execute = self._channel.execute if self._channel else redis.execute_command
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None
        self._in_flight = 0
        self.round_trips = 0

    async def load(self) -> None:
        sha = await self._execute("SCRIPT", "LOAD", self._source)
        self._sha = sha.decode() if isinstance(sha, bytes) else sha

    async def aclose(self) -> None:
        """Close the script's own connection (the redis-py client is the caller's)."""
        if self._channel is not None:
            await self._channel.aclose()

    async def __call__(self, args: Sequence[Any]) -> Any:
        """One check: ``args`` are its ARGV group (the script's fixed arity)."""
        # Encoded here, before joining a batch: an argument Redis cannot take
        # fails this call alone (DataError), never the calls it would travel with.
        call = tuple(encode(a) for a in args)
        if self._pending is not None:  # a leader is gathering this tick's calls: join it
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append((call, fut))
            return await fut
        if not self._in_flight:  # the wire is idle: go now
            results = await self._pipeline([call])
        else:
            # Lead: let the tasks ready in this tick join, then send them all.
            self._pending = []
            try:
                await asyncio.sleep(0)
            finally:
                followers, self._pending = self._pending, None
                if followers:
                    # In its own task: cancelling the leader must not strand the followers.
                    sent = asyncio.ensure_future(self._send([(call, None), *followers]))
            if not followers:
                results = await self._pipeline([call])
            else:
                results = await asyncio.shield(sent)
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    async def _send(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any] | None]]
    ) -> list[Any]:
        try:
            results = await self._pipeline([c for c, _ in batch])
        except BaseException as exc:
            for _, f in batch:
                if f is not None and not f.done():
                    f.set_exception(exc)
            raise
        if len(results) != len(batch):  # the script broke its contract: fail everyone now
            broken = ResponseError(f"{len(results)} results for {len(batch)} calls")
            for _, f in batch:
                if f is not None and not f.done():
                    f.set_exception(broken)
            raise broken
        for (_, f), res in zip(batch, results, strict=True):
            if f is None or f.done():
                continue
            if isinstance(res, Exception):
                f.set_exception(res)
            else:
                f.set_result(res)
        return results

    async def _pipeline(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """All calls in one EVALSHA: ARGV = count, then each call's arguments."""
        argv: list[Any] = [len(calls)]
        for call in calls:
            argv.extend(call)
        self._in_flight += 1
        try:
            if self._sha is None:
                await self.load()
            assert self._sha is not None
            for attempt in (1, 2):
                self.round_trips += 1
                try:
                    return list(await self._execute("EVALSHA", self._sha, 0, *argv))
                except NoScriptError:
                    if attempt == 2:
                        raise
                    await self.load()  # Redis restarted and lost its script cache
            raise AssertionError("unreachable")
        finally:
            self._in_flight -= 1
