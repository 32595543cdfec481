"""The usage consumer: batches from ``usage.events`` into the usage pipeline.

A Faust service (started and stopped with the worker, next to its timers,
web views and producer) that fetches whole batches with aiokafka instead of
receiving records one by one through a Faust agent: Faust's per-record path
costs ~90 µs of CPU per record here and capped an empty ``stream.take``
agent at 7.5-11.6k records/s, below the pipeline's target (see
docs/decisions.md, "Usage consumer").

Thin on purpose: it fetches, converts records, calls
:class:`metering.usage.pipeline.UsagePipeline` and commits offsets.

* Offsets are committed only after ``process`` returned, i.e. after the
  batch is in PostgreSQL, and strictly in fetch order: with ``writers``
  batches in flight, a later batch's offsets are never committed before an
  earlier one's. A crash therefore redelivers, never skips; the event-id
  dedup makes the redelivery harmless.
* On a rebalance, in-flight batches are finished and committed before the
  partitions are handed over.
* A record cannot make ``process`` raise: decoding turns every failure into
  a dead letter, outages are retried inside the pipeline, and dead letters
  too large to publish go out truncated. If it raises anyway (a bug in the
  pipeline), the service crashes the worker without committing.
* A commit refused because the group moved on (a drain that outlasted the
  rebalance timeout, a coordinator change) is logged, not fatal: the
  partitions' new owner re-reads those batches and the event-id dedup makes
  the re-read harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, cast

import faust
import mode
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from metering.alerts.webhooks import WebhookSender
from metering.events import TimePolicy
from metering.settings import Settings
from metering.usage.counters import UsageCounters
from metering.usage.deadletters import RawRecord
from metering.usage.pipeline import UsagePipeline
from streams.deadletters import FaustDeadLetters
from streams.detection import Detection

log = logging.getLogger(__name__)

Offsets = dict[TopicPartition, int]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: UsageConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info(
            "usage consumer revoked %s; finishing %d batch(es) in flight",
            sorted(tp.partition for tp in revoked),
            self._owner.inflight,
        )
        await self._owner.drain()
        detection = self._owner.detection
        if detection is not None:  # save their state, then commit what it covers
            await detection.revoked(tp.partition for tp in revoked)
            await self._owner.commit_retired(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("usage consumer assigned %s", sorted(tp.partition for tp in assigned))
        if self._owner.detection is not None:  # before their first batch
            await self._owner.detection.assigned(tp.partition for tp in assigned)


class UsageConsumer(mode.Service):
    """Fetch -> process -> commit, with up to ``settings.writers`` batches in flight."""

    def __init__(
        self,
        *,
        settings: Settings,
        pipeline: UsagePipeline,
        dead_letters: FaustDeadLetters,
        redis: aioredis.Redis,
        detection: Detection | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.detection = detection
        self.pipeline = pipeline
        self.dead_letters = dead_letters
        self._redis = redis
        super().__init__(**kwargs)

    def __post_init__(self) -> None:
        self._consumer: AIOKafkaConsumer | None = None
        self._inflight: deque[tuple[asyncio.Task[object], Offsets]] = deque()
        self._retired: Offsets = {}  # written to PostgreSQL; committed as far as detection allows
        self._retire_lock = asyncio.Lock()
        self._fetching = True
        self._stopping = False
        self._loop_done = asyncio.Event()

    async def on_start(self) -> None:
        if self.detection is not None:
            self.detection.after_checkpoint = lambda: self.commit_retired()
            await self.detection.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=f"{self.settings.worker_id}-usage-events",
            group_instance_id=self.settings.worker_instance_id or None,
            client_id=f"{self.settings.worker_id}-usage",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.batch_size,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=int(self.settings.batch_within_s * 1000),
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, self.settings.session_timeout_s / 3) * 1000),
            max_poll_interval_ms=600_000,  # a PostgreSQL outage pauses us; don't leave the group
        )
        self._consumer.subscribe([self.settings.events_topic], listener=_Rebalance(self))
        await self._consumer.start()

    async def on_stop(self) -> None:
        # Stop fetching, let the batches in flight finish, commit them, leave.
        self._fetching = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loop_done.wait(), self.settings.batch_within_s + 5)
        # Don't wait out an outage on shutdown: batches still failing are
        # abandoned uncommitted (redelivered); healthy ones finish and commit.
        self._stopping = True
        self.pipeline.interrupt()
        if self._consumer is not None:
            try:
                await self.drain()
                if self.detection is not None:  # save the state, commit what it covers
                    # (not waiting out an outage: unsaved state is replayed next time)
                    await self.detection.checkpoint(wait_s=5.0)
                    await self.commit_retired()
            except Exception:
                log.exception("could not finish the batches in flight; Kafka will redeliver them")
            await self._consumer.stop()
            self._consumer = None
        if self.detection is not None:
            await self.detection.stop()
        await self.pipeline.stop()
        await self._redis.aclose()

    @mode.Service.task
    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        timeout_ms = int(self.settings.batch_within_s * 1000)
        try:
            await self._fetch_loop(consumer, timeout_ms)
        finally:
            self._loop_done.set()

    async def _fetch_loop(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> None:
        while self._fetching and not self.should_stop:
            fetched = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.settings.batch_size
            )
            records: list[RawRecord] = []
            offsets: Offsets = {}
            for tp, msgs in fetched.items():
                for m in msgs:
                    records.append(
                        RawRecord(
                            value=m.value,
                            key=m.key,
                            topic=m.topic,
                            partition=m.partition,
                            offset=m.offset,
                            timestamp_ms=m.timestamp,
                            headers=list(m.headers),
                        )
                    )
                offsets[tp] = msgs[-1].offset + 1
            if records:
                if self.detection is not None:  # a partition's state before its first batch
                    await self.detection.ready()
                task = asyncio.create_task(self.pipeline.process(records))
                self._inflight.append((task, offsets))
            # Keep at most `writers` batches in flight; retire finished ones in order.
            while self._inflight and (
                len(self._inflight) >= self.settings.writers or self._inflight[0][0].done()
            ):
                await self._retire_oldest()

    async def _retire_oldest(self) -> None:
        """Wait for the oldest batch in flight, then commit its offsets."""
        async with self._retire_lock:
            if not self._inflight:
                return
            task, offsets = self._inflight[0]
            try:
                # shield: stopping the fetch loop must not cancel a half-written batch
                await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    await self._abandon_inflight()
                    return
                log.critical(
                    "usage batch could not be persisted; stopping without committing it",
                    exc_info=True,
                )
                await self.crash(exc)
                raise
            self._inflight.popleft()
            consumer = self._consumer
            assert consumer is not None
            # Partitions handed over since the fetch are the new owner's to commit.
            owned = consumer.assignment()
            if handed_over := sorted(tp.partition for tp in offsets if tp not in owned):
                log.info("not committing offsets of partitions handed over: %s", handed_over)
                offsets = {tp: offset for tp, offset in offsets.items() if tp in owned}
                if not offsets:
                    return
            self._retired.update(offsets)
            await self._commit(consumer, offsets)

    async def commit_retired(self, tps: Sequence[TopicPartition] | None = None) -> None:
        """Commit what was written, as far as the detection state is saved
        (after a checkpoint, and before partitions are handed over)."""
        async with self._retire_lock:
            consumer = self._consumer
            if consumer is None:
                return
            owned = consumer.assignment()
            chosen = self._retired if tps is None else {tp: self._retired.get(tp) for tp in tps}
            offsets = {tp: o for tp, o in chosen.items() if o is not None and tp in owned}
            if offsets:
                await self._commit(consumer, offsets)
            for tp in tps or ():
                self._retired.pop(tp, None)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: Offsets) -> None:
        if self.detection is not None:  # not past events whose detection state is unsaved
            offsets = {tp: self.detection.cap(tp.partition, o) for tp, o in offsets.items()}
        if offsets:
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                # E.g. CommitFailedError / IllegalStateError after the group
                # evicted us during a long drain: the batch is in PostgreSQL;
                # whoever owns the partitions now re-reads it as duplicates.
                log.warning(
                    "offset commit refused (%r); the batch is written and will be "
                    "redelivered as duplicates",
                    exc,
                )

    async def _abandon_inflight(self) -> None:
        """Shutdown during an outage: commit nothing more (a later batch's offsets
        would skip the unwritten one); Kafka redelivers them all."""
        log.warning(
            "stopping during an outage: %d batch(es) in flight not written and not "
            "committed; Kafka will redeliver them",
            len(self._inflight),
        )
        tasks = [task for task, _ in self._inflight]
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def drain(self) -> None:
        """Finish and commit every batch in flight (rebalance, shutdown)."""
        while self._inflight:
            await self._retire_oldest()


def add_usage_consumer(
    app: faust.App,
    settings: Settings,
    dlq: faust.types.TopicT,
    *,
    observe_batch_seconds: Callable[[float], None] | None = None,
    sender: WebhookSender | None = None,
) -> UsageConsumer:
    """Build the usage pipeline for ``settings`` and attach its consumer and
    housekeeping to ``app``. Nothing connects until the worker starts."""
    dead_letters = FaustDeadLetters(dlq, max_request_bytes=app.conf.producer_max_request_size)
    redis_client = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)

    def policy() -> TimePolicy:
        return TimePolicy(
            max_future_skew=timedelta(seconds=settings.max_future_skew_s),
            retention=timedelta(days=settings.retention_days),
        )

    detection = None
    if settings.detection_enabled:
        assert sender is not None, "detection queues webhooks: it needs the worker's sender"
        detection = Detection(settings, sender)
    pipeline = UsagePipeline(
        database_url=settings.database_url,
        counters=UsageCounters(redis=redis_client, prefix=settings.redis_key_prefix),
        dead_letters=dead_letters,
        policy=policy,
        writers=settings.writers,
        command_timeout_s=settings.db_command_timeout_s,
        retention_days=settings.retention_days,
        drop_expired=not settings.archive_dir,
        partitions_ahead_months=settings.partitions_ahead_months,
        observe_batch_seconds=observe_batch_seconds,
        observe_events=detection.observe if detection is not None else None,
    )
    consumer = UsageConsumer(
        settings=settings,
        pipeline=pipeline,
        dead_letters=dead_letters,
        redis=redis_client,
        detection=detection,
    )
    # app.service takes a class or an instance (Faust starts either with the app)
    app.service(cast(Any, consumer))

    @app.task
    async def reconcile_on_start() -> None:
        await pipeline.reconcile()

    @app.timer(interval=settings.reconcile_interval_s)
    async def reconcile() -> None:
        await pipeline.reconcile()

    return consumer
