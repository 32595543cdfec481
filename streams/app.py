"""The Faust application, built from settings: wiring only.

``create_app(settings)`` declares the topics, attaches the usage consumer,
its housekeeping timers (and billing's), and the web views, and returns the app; nothing
connects until a worker starts it. ``metering worker`` is the entry point
(it passes its command-line options in as settings).
"""

from __future__ import annotations

from typing import Any, cast

import faust
from prometheus_client import Histogram

from metering.settings import Settings
from streams.billing import add_billing
from streams.notify import Notifications
from streams.topics import dead_letter_topic
from streams.usage import add_usage_consumer
from streams.web import add_web_views, worker_metrics

FAUST_GROUP_SESSION_S = 6.0  # the broker's group.min.session.timeout.ms
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def create_app(settings: Settings) -> faust.App:
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        topic_replication_factor=settings.replication_factor,
        topic_partitions=settings.events_partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        # Faust's own consumer group carries no partitions of ours (the usage
        # consumer has its group), but the app starts its services only once
        # that group is joined: after a crash, a long session would hold a
        # restarted worker for its length. The broker's minimum keeps it short.
        broker_session_timeout=FAUST_GROUP_SESSION_S,
        broker_heartbeat_interval=FAUST_GROUP_SESSION_S / 3,
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
    )
    batch_seconds = Histogram(
        "metering_batch_duration_seconds",
        "Time to decode, write and count one batch (from fetch to committed totals).",
        buckets=BATCH_BUCKETS,
        registry=None,
    )
    notifications = Notifications(settings)
    app.service(cast(Any, notifications))
    consumer = add_usage_consumer(
        app,
        settings,
        dead_letter_topic(app, settings),
        observe_batch_seconds=batch_seconds.observe,
        sender=notifications.sender,
    )
    metrics = worker_metrics(consumer, notifications)
    metrics.registry.register(batch_seconds)
    add_web_views(app, consumer, metrics)
    add_billing(app, settings)
    return app
