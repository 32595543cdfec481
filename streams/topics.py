"""Topic declarations. Values are raw bytes: the agents decode them so a
malformed record goes to the dead-letter topic instead of killing the agent."""

from __future__ import annotations

from streams.app import app, settings

usage_events = app.topic(
    settings.events_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.events_partitions,
)

usage_dlq = app.topic(
    settings.dlq_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=1,
)
