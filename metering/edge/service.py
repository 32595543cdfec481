"""``MeteringEdge``: the guard and the producer an edge service needs, built
from settings, with ``start()``/``stop()`` and the edge's metrics."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from metering.edge.guard import EdgeGuard
from metering.edge.producer import UsageProducer
from metering.metrics import Family, render


class MeteringEdge:
    """Everything an edge service needs, built from settings, with start()/stop().

    Use it from the app's lifespan::

        edge = MeteringEdge(Settings.from_env())

        @asynccontextmanager
        async def lifespan(app):
            async with edge:
                yield

        app = FastAPI(lifespan=lifespan)
        app.add_middleware(MeteringMiddleware, guard=edge.guard, producer=edge.producer)

    ``guard`` and ``producer`` exist from construction (so the middleware can
    be added before start). Nothing in ``start()`` needs PostgreSQL, Redis or
    Kafka to be up: the app starts and serves cached keys while any of them is
    down (the database pool connects on first use, the producer retries).
    """

    def __init__(self, settings: Any, *, clock: Callable[[], datetime] | None = None) -> None:
        import asyncpg
        import redis.asyncio as aioredis

        self._settings = settings
        self._redis = aioredis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._pool_factory = lambda: asyncpg.create_pool(
            settings.database_url, min_size=0, max_size=4, server_settings={"timezone": "UTC"}
        )
        self._pool: Any = None
        self.producer = UsageProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            topic=settings.events_topic,
            linger_ms=settings.producer_linger_ms,
            buffer_size=settings.producer_buffer,
        )
        self.guard = EdgeGuard(
            redis=self._redis,
            pool=_LazyPool(self),
            pepper=settings.pepper,
            prefix=settings.redis_key_prefix,
            key_cache_ttl_s=settings.key_cache_ttl_s,
            negative_cache_ttl_s=settings.negative_cache_ttl_s,
            anonymous_per_day=settings.anonymous_per_day,
            auth_failures_per_minute=settings.auth_failures_per_minute,
            redis_failure_mode=settings.redis_failure_mode,
            last_used_flush_s=settings.last_used_flush_s,
            clock=clock,
        )

    async def start(self) -> None:
        self._pool = await self._pool_factory()
        await self.producer.start()
        await self.guard.start()

    async def stop(self) -> None:
        await self.guard.stop()
        await self.producer.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await self._redis.aclose()

    def metrics(self) -> str:
        """This process's edge counters as Prometheus text (serve it on ``/metrics``)."""
        g, p = self.guard.stats, self.producer.stats
        counter = "counter"
        return render(
            [
                Family.one(
                    "metering_edge_checks_total",
                    counter,
                    "Requests checked against Redis (keyless requests to protected paths are rejected before).",
                    g.checks,
                ),
                Family.by(
                    "metering_edge_rejected_total",
                    counter,
                    "Requests answered 401, 403, 429 or 503, by reason.",
                    "reason",
                    g.rejected,
                ),
                Family.by(
                    "metering_edge_shadowed_total",
                    counter,
                    "Requests a limit would have rejected, let through by shadow mode, by reason.",
                    "reason",
                    g.shadowed,
                ),
                Family.one(
                    "metering_edge_key_cache_misses_total",
                    counter,
                    "Checks that looked the key up in PostgreSQL.",
                    g.cache_misses,
                ),
                Family.one(
                    "metering_edge_redis_failures_total",
                    counter,
                    "Checks made without Redis: the failure policy (open or closed) applied.",
                    g.redis_failures,
                ),
                Family.one(
                    "metering_edge_redis_round_trips_total",
                    counter,
                    "Script calls sent to Redis (concurrent checks share one).",
                    self.guard.round_trips,
                ),
                Family.one(
                    "metering_edge_events_emitted_total",
                    counter,
                    "Usage events offered to the producer (= sent + dropped + buffered).",
                    p.emitted,
                ),
                Family.one(
                    "metering_edge_events_sent_total",
                    counter,
                    "Usage events acknowledged by Kafka.",
                    p.sent,
                ),
                Family.one(
                    "metering_edge_events_dropped_total",
                    counter,
                    "Usage events lost: buffer full, too large, emitted during shutdown, or "
                    "still unsent when shutdown ran out of time.",
                    p.dropped,
                ),
                Family.one(
                    "metering_edge_producer_send_errors_total",
                    counter,
                    "Failed Kafka sends (the events are retried).",
                    p.send_errors,
                ),
                Family.one(
                    "metering_edge_events_buffered",
                    "gauge",
                    "Usage events waiting for Kafka or in flight to it.",
                    self.producer.buffered,
                ),
            ]
        )

    async def __aenter__(self) -> MeteringEdge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _LazyPool:
    """Lets the guard be built before the pool exists (the pool opens in start())."""

    def __init__(self, edge: MeteringEdge) -> None:
        self._edge = edge

    def acquire(self) -> Any:
        if self._edge._pool is None:
            raise RuntimeError("MeteringEdge.start() was not called")
        return self._edge._pool.acquire()
