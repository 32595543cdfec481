"""The Faust application. Wiring only: settings in, app and services out.

Run it with ``metering worker`` (or ``faust -A streams.app worker``).
"""

from __future__ import annotations

import faust

from metering.settings import Settings

settings = Settings.from_env()

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

# Registers topics, agents, timers and pages on import.
from streams import agents  # noqa: E402,F401
