"""Health and Prometheus metrics on the worker's web port (default 6066)."""

from __future__ import annotations

import time

import faust
from faust.web import Request, Response, View

from metering.metrics import CONTENT_TYPE, MetricSet
from streams.detection import Detection
from streams.notify import Notifications
from streams.usage import UsageConsumer


def worker_metrics(consumer: UsageConsumer, notifications: Notifications) -> MetricSet:
    """The worker's metrics, mirrored from its pipeline's counters at each scrape."""
    s, dead_letters = consumer.pipeline.stats, consumer.dead_letters
    m = MetricSet()
    m.counter("metering_batches_total", "Batches committed.", lambda: s.batches)
    m.counter("metering_records_total", "Records consumed.", lambda: s.records)
    m.counter("metering_events_inserted_total", "Events written.", lambda: s.inserted)
    m.counter(
        "metering_events_duplicate_total",
        "Events seen before (not counted again).",
        lambda: s.duplicates,
    )
    m.counter(
        "metering_dead_letters_total",
        "Records sent to the dead-letter topic, by reason.",
        lambda: s.dead_letters,
        label="reason",
    )
    m.counter(
        "metering_dead_letters_unpublishable_total",
        "Dead letters the DLQ refused even without their value (skipped, logged).",
        lambda: dead_letters.unpublishable,
    )
    m.counter(
        "metering_db_retries_total",
        "Retries of a batch step during an outage (PostgreSQL, the DLQ).",
        lambda: s.db_retries,
    )
    m.gauge(
        "metering_pipeline_paused",
        "1 while an outage pauses the pipeline (batches retried, offsets held).",
        lambda: int(s.paused_since is not None),
    )
    m.gauge(
        "metering_pipeline_paused_seconds",
        "How long the current outage has paused the pipeline (0: running).",
        lambda: round(time.time() - s.paused_since, 3) if s.paused_since else 0.0,
    )
    m.counter(
        "metering_reconcile_failures_total",
        "Housekeeping runs (partitions, Redis rebuild) that failed.",
        lambda: s.reconcile_failures,
    )
    m.counter(
        "metering_redis_failures_total",
        "Counter updates that Redis refused (rebuilt later).",
        lambda: s.redis_failures,
    )
    m.gauge(
        "metering_last_batch_seconds", "Duration of the last batch.", lambda: s.last_batch_seconds
    )
    m.gauge(
        "metering_first_batch_timestamp_seconds",
        "When the first batch committed (Unix time).",
        lambda: s.first_batch_at or 0,
    )
    m.gauge(
        "metering_last_batch_timestamp_seconds",
        "When the last batch committed (Unix time).",
        lambda: s.last_batch_at or 0,
    )
    m.gauge(
        "metering_seconds_since_last_batch",
        "Seconds since the last batch committed (-1: none yet).",
        lambda: round(time.time() - s.last_batch_at, 3) if s.last_batch_at else -1,
    )
    if consumer.detection is not None:
        detection_metrics(m, consumer.detection)
    notification_metrics(m, notifications)
    return m


def notification_metrics(m: MetricSet, n: Notifications) -> None:
    sent = n.sender.stats
    m.counter("metering_webhook_attempts_total", "Webhook attempts.", lambda: sent.attempts)
    m.counter(
        "metering_webhook_delivered_total", "Webhooks delivered (2xx).", lambda: sent.delivered
    )
    m.counter(
        "metering_webhook_given_up_total",
        "Webhooks that failed every attempt.",
        lambda: sent.given_up,
    )
    m.counter(
        "metering_usage_notices_total",
        "Usage threshold notices queued (80 %/100 % of a daily quota or spend limit).",
        lambda: n.notices_sent,
    )
    m.counter(
        "metering_usage_notice_check_failures_total",
        "Threshold checks that failed (run again at the next interval).",
        lambda: n.check_failures,
    )


def detection_metrics(m: MetricSet, d: Detection) -> None:
    st = d.detector.stats
    m.counter("metering_detection_events_total", "Events the rules saw.", lambda: st.events)
    m.counter(
        "metering_detection_replayed_total",
        "Replayed events the restored state already held (skipped).",
        lambda: st.skipped,
    )
    m.counter(
        "metering_detection_findings_total", "Findings the rules raised.", lambda: st.findings
    )
    m.counter(
        "metering_detection_seconds_total",
        "Time the rules took in the stream's path (the detector's share of the worker).",
        lambda: round(d.observe_seconds, 6),
    )
    m.counter(
        "metering_detection_recorded_total", "Findings recorded as alerts.", lambda: d.recorded
    )
    m.counter(
        "metering_detection_record_failures_total",
        "Attempts to record a finding that failed (retried).",
        lambda: d.record_failures,
    )
    m.counter(
        "metering_detection_checkpoints_total",
        "Detection state saved to its changelog.",
        lambda: d.checkpoints,
    )
    m.gauge("metering_detection_keys", "Keys with detection state.", lambda: d.detector.size()[0])
    m.gauge(
        "metering_detection_addresses",
        "Addresses with failed-authentication state.",
        lambda: d.detector.size()[1],
    )
    m.gauge(
        "metering_detection_restore_seconds",
        "How long the last restore of the state took.",
        lambda: d.last_restore_s,
    )


def add_web_views(app: faust.App, consumer: UsageConsumer, metrics: MetricSet) -> None:
    """``/metering/health`` and ``/metrics`` for the consumer's pipeline."""
    stats = consumer.pipeline.stats

    @app.page("/metering/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            body = {
                "status": "paused" if stats.paused_since else "ok",
                "batches": stats.batches,
                "last_batch_at": stats.last_batch_at,
                "paused_since": stats.paused_since,
                "pause_reason": stats.pause_reason or None,
            }
            return self.json(body)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.text(metrics.exposition().decode(), content_type=CONTENT_TYPE)
