"""Health and Prometheus metrics on the worker's web port (default 6066)."""

from __future__ import annotations

import time

import faust
from faust.web import Request, Response, View

from metering.metrics import CONTENT_TYPE, Family, render
from streams.usage import UsageConsumer


def add_web_views(app: faust.App, consumer: UsageConsumer) -> None:
    """``/metering/health`` and ``/metrics`` for the consumer's pipeline."""
    pipeline, dead_letters = consumer.pipeline, consumer.dead_letters

    @app.page("/metering/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            s = pipeline.stats
            body = {
                "status": "paused" if s.paused_since else "ok",
                "batches": s.batches,
                "last_batch_at": s.last_batch_at,
                "paused_since": s.paused_since,
                "pause_reason": s.pause_reason or None,
            }
            return self.json(body)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            s = pipeline.stats
            counter, gauge = "counter", "gauge"
            now = time.time()
            since = (now - s.last_batch_at) if s.last_batch_at else -1
            paused = (now - s.paused_since) if s.paused_since else 0.0
            body = render(
                [
                    Family.one("metering_batches_total", counter, "Batches committed.", s.batches),
                    Family.one("metering_records_total", counter, "Records consumed.", s.records),
                    Family.one(
                        "metering_events_inserted_total", counter, "Events written.", s.inserted
                    ),
                    Family.one(
                        "metering_events_duplicate_total",
                        counter,
                        "Events seen before (not counted again).",
                        s.duplicates,
                    ),
                    Family.by(
                        "metering_dead_letters_total",
                        counter,
                        "Records sent to the dead-letter topic, by reason.",
                        "reason",
                        s.dead_letters,
                    ),
                    Family.one(
                        "metering_dead_letters_unpublishable_total",
                        counter,
                        "Dead letters the DLQ refused even without their value (skipped, logged).",
                        dead_letters.unpublishable,
                    ),
                    Family.one(
                        "metering_db_retries_total",
                        counter,
                        "Retries of a batch step during an outage (PostgreSQL, the DLQ).",
                        s.db_retries,
                    ),
                    Family.one(
                        "metering_pipeline_paused",
                        gauge,
                        "1 while an outage pauses the pipeline (batches retried, offsets held).",
                        int(s.paused_since is not None),
                    ),
                    Family.one(
                        "metering_pipeline_paused_seconds",
                        gauge,
                        "How long the current outage has paused the pipeline (0: running).",
                        round(paused, 3),
                    ),
                    Family.one(
                        "metering_reconcile_failures_total",
                        counter,
                        "Housekeeping runs (partitions, Redis rebuild) that failed.",
                        s.reconcile_failures,
                    ),
                    Family.one(
                        "metering_redis_failures_total",
                        counter,
                        "Counter updates that Redis refused (rebuilt later).",
                        s.redis_failures,
                    ),
                    Family.one(
                        "metering_last_batch_seconds",
                        gauge,
                        "Duration of the last batch.",
                        round(s.last_batch_seconds, 6),
                    ),
                    Family.one(
                        "metering_first_batch_timestamp_seconds",
                        gauge,
                        "When the first batch committed (Unix time).",
                        round(s.first_batch_at or 0, 6),
                    ),
                    Family.one(
                        "metering_last_batch_timestamp_seconds",
                        gauge,
                        "When the last batch committed (Unix time).",
                        round(s.last_batch_at or 0, 6),
                    ),
                    Family.one(
                        "metering_seconds_since_last_batch",
                        gauge,
                        "Seconds since the last batch committed (-1: none yet).",
                        round(since, 3),
                    ),
                ]
            )
            return self.text(body, content_type=CONTENT_TYPE)
