"""Redis Lua scripts, and running many calls of one in a single round trip.

:class:`CoalescingScript` gathers every call made during one event-loop tick
and sends them as one pipeline of EVALSHA: with 64 concurrent requests that
is one round trip instead of 64 (redis-py costs ~220 µs of client time per
awaited command here, so per-call round trips cap a process at a few
thousand checks per second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


def load_source(name: str, *, with_gcra: bool = True) -> str:
    """The text of ``metering/lua/<name>.lua``, with the GCRA helpers in front."""
    lua = resources.files("metering").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    return (lua.joinpath("gcra.lua").read_text() + "\n" + body) if with_gcra else body


class CoalescingScript:
    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha: str | None = None
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None
        self.round_trips = 0

    async def load(self) -> None:
        self._sha = await self._redis.script_load(self._source)

    async def __call__(self, args: Sequence[Any]) -> Any:
        """One check: ``args`` are its ARGV group (the script's fixed arity)."""
        call = tuple(args)
        if self._pending is not None:  # a leader is gathering this tick's calls: join it
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append((call, fut))
            return await fut
        # Lead: give the other tasks ready in this tick one chance to join, then
        # send everything gathered as one script call and hand out the answers.
        self._pending = []
        try:
            await asyncio.sleep(0)
        finally:
            followers, self._pending = self._pending, None
            if followers:
                # In its own task: cancelling the leader must not strand the followers.
                sent = asyncio.ensure_future(self._send([(call, None), *followers]))
        if not followers:  # alone this tick (the common case at low load): no extra task
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
        if self._sha is None:
            await self.load()
        assert self._sha is not None
        argv: list[Any] = [len(calls)]
        for call in calls:
            argv.extend(call)
        for attempt in (1, 2):
            self.round_trips += 1
            try:
                return list(await self._redis.evalsha(self._sha, 0, *argv))
            except NoScriptError:
                if attempt == 2:
                    raise
                await self.load()  # Redis restarted and lost its script cache
        raise AssertionError("unreachable")
