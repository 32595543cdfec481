"""The usage agent: batches from ``usage.events`` into the usage pipeline.

Thin on purpose: it batches, converts Faust events to plain records, and
calls :class:`metering.pipeline.UsagePipeline`. Offsets are acknowledged by
``take_events`` only after ``process`` returns, i.e. after the batch is
committed to PostgreSQL. If ``process`` ever raises, the worker exits at
once without committing offsets (Kafka redelivers the batch to the next
worker, and the event-id dedup makes that harmless); letting the exception
unwind would let Faust acknowledge events that were never written.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import mode
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from faust.types import EventT, StreamT

from metering.counters import UsageCounters
from metering.errors import ServiceUnavailable
from metering.events import TimePolicy
from metering.pipeline import DeadLetter, RawRecord, UsagePipeline
from streams.app import app, settings
from streams.topics import usage_dlq, usage_events

log = logging.getLogger(__name__)
EXIT_UNPERSISTED_BATCH = 70


class FaustDeadLetters:
    """Publishes dead letters with the app's producer and waits for the acks."""

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        try:
            futures = [
                await usage_dlq.send(
                    key=letter.record.key, value=letter.record.value, headers=letter.headers()
                )
                for letter in letters
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise ServiceUnavailable(f"dead-letter publish failed: {exc}") from exc


def _policy() -> TimePolicy:
    from datetime import timedelta

    return TimePolicy(
        max_future_skew=timedelta(seconds=settings.max_future_skew_s),
        retention=timedelta(days=settings.retention_days),
    )


redis_client = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
pipeline = UsagePipeline(
    database_url=settings.database_url,
    counters=UsageCounters(redis=redis_client, prefix=settings.redis_key_prefix),
    dead_letters=FaustDeadLetters(),
    policy=_policy,
    retention_days=settings.retention_days,
    partitions_ahead_months=settings.partitions_ahead_months,
)


def to_record(event: EventT) -> RawRecord:
    msg = event.message
    headers = msg.headers or []
    if isinstance(headers, dict):
        headers = list(headers.items())
    return RawRecord(
        value=msg.value,
        key=msg.key,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
        headers=[(k, v) for k, v in headers],
    )


@app.agent(usage_events, name="usage", concurrency=1)
async def usage(stream: StreamT[bytes]) -> None:
    async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        try:
            result = await pipeline.process([to_record(e) for e in batch])
        except BaseException:
            log.critical(
                "usage batch of %d events could not be persisted; exiting without "
                "committing offsets so Kafka redelivers it",
                len(batch),
                exc_info=True,
            )
            logging.shutdown()
            os._exit(EXIT_UNPERSISTED_BATCH)
        log.debug(
            "batch: %d records, %d inserted, %d duplicates, %d dead letters",
            result.records,
            result.inserted,
            result.duplicates,
            result.dead_letters,
        )


@app.task
async def reconcile_on_start() -> None:
    await pipeline.reconcile()


@app.timer(interval=settings.reconcile_interval_s)
async def reconcile() -> None:
    await pipeline.reconcile()


@app.service
class PipelineResources(mode.Service):
    """Closes the pipeline's connections when the worker stops."""

    async def on_stop(self) -> None:
        await pipeline.stop()
        await redis_client.aclose()
