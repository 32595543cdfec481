"""The Faust application, built from settings: wiring only.

``create_app(settings)`` declares the topics, attaches the usage consumer,
its housekeeping timers and the web views, and returns the app; nothing
connects until a worker starts it. ``metering worker`` is the entry point
(it passes its command-line options in as settings).
"""

from __future__ import annotations

import faust

from metering.settings import Settings
from streams.topics import dead_letter_topic
from streams.usage import add_usage_consumer
from streams.web import add_web_views


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
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
    )
    consumer = add_usage_consumer(app, settings, dead_letter_topic(app, settings))
    add_web_views(app, consumer)
    return app
