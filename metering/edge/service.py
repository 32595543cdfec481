"""``MeteringEdge``: the guard and the producer an edge service needs, built
from settings, with ``start()``/``stop()`` and the edge's metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from metering.edge.guard import EdgeGuard
from metering.edge.producer import UsageProducer
from metering.edge.summary import RefusedSummary
from metering.metrics import MetricSet, multiprocess_dir

METRICS_SYNC_S = 1.0
# request overhead: a warm check is ~0.2 ms; a cache miss adds a PostgreSQL lookup
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def edge_metrics(guard: EdgeGuard, producer: UsageProducer) -> MetricSet:
    """The edge's metrics: its guard's and producer's counters, and the overhead histogram."""
    g, p = guard.stats, producer.stats
    m = MetricSet()
    m.counter(
        "metering_edge_checks_total",
        "Requests checked against Redis (keyless requests to protected paths are rejected before).",
        lambda: g.checks,
    )
    m.counter(
        "metering_edge_rejected_total",
        "Requests answered 401, 403, 429 or 503, by reason.",
        lambda: g.rejected,
        label="reason",
    )
    m.counter(
        "metering_edge_shadowed_total",
        "Requests a limit would have rejected, let through by shadow mode, by reason.",
        lambda: g.shadowed,
        label="reason",
    )
    m.counter(
        "metering_edge_key_cache_misses_total",
        "Checks that looked the key up in PostgreSQL.",
        lambda: g.cache_misses,
    )
    m.counter(
        "metering_edge_redis_failures_total",
        "Checks made without Redis: the failure policy (open or closed) applied.",
        lambda: g.redis_failures,
    )
    m.counter(
        "metering_edge_redis_round_trips_total",
        "Script calls sent to Redis (concurrent checks share one).",
        lambda: guard.round_trips,
    )
    m.counter(
        "metering_edge_events_emitted_total",
        "Usage events offered to the producer (= sent + dropped + buffered).",
        lambda: p.emitted,
    )
    m.counter(
        "metering_edge_events_sent_total", "Usage events acknowledged by Kafka.", lambda: p.sent
    )
    m.counter(
        "metering_edge_events_dropped_total",
        "Usage events lost: buffer full, too large, emitted during shutdown, or "
        "still unsent when shutdown ran out of time.",
        lambda: p.dropped,
    )
    m.counter(
        "metering_edge_events_dropped_unbilled_total",
        "Of the dropped: events of refused or anonymous requests (their own, smaller budget).",
        lambda: p.dropped_unbilled,
    )
    m.counter(
        "metering_edge_requests_summarised_total",
        "Refused requests folded into per-client, per-minute summary records.",
        lambda: p.summarised,
    )
    m.counter(
        "metering_edge_producer_send_errors_total",
        "Failed Kafka sends (the events are retried).",
        lambda: p.send_errors,
    )
    m.gauge(
        "metering_edge_events_buffered",
        "Usage events waiting for Kafka or in flight to it.",
        lambda: producer.buffered,
    )
    overhead = m.histogram(
        "metering_edge_overhead_seconds",
        "Time the middleware added to a request: key check (Redis, a PostgreSQL lookup on a "
        "cache miss) and emitting the usage event.",
        OVERHEAD_BUCKETS,
    )
    g.observe_overhead = overhead.observe
    return m


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
            unbilled_buffer_size=settings.producer_unbilled_buffer,
            summary=RefusedSummary(
                allowance=settings.refused_records_per_minute,
                ipv6_prefix=settings.ipv6_bucket_prefix,
            ),
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
            ipv6_bucket_prefix=settings.ipv6_bucket_prefix,
            edge_instances=settings.edge_instances,
            clock=clock,
        )
        self._metrics = edge_metrics(self.guard, self.producer)
        self._syncer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pool = await self._pool_factory()
        await self.producer.start()
        await self.guard.start()
        if multiprocess_dir() and self._syncer is None:
            self._syncer = asyncio.create_task(self._sync_metrics_forever())

    async def stop(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
            self._metrics.sync()
            self._metrics.close()
        await self.guard.stop()
        await self.producer.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await self._redis.aclose()

    def metrics(self) -> str:
        """The edge's metrics as Prometheus text (serve it on ``/metrics``): this
        process's, or every worker's in multiprocess mode (:mod:`metering.metrics`)."""
        return self._metrics.exposition().decode()

    async def _sync_metrics_forever(self) -> None:
        """Multiprocess mode: keep this worker's numbers current for whichever
        worker answers the scrape."""
        while True:
            await asyncio.sleep(METRICS_SYNC_S)
            self._metrics.sync()

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
