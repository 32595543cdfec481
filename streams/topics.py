"""Topic declarations. Values are raw bytes: consumers decode them themselves
so a malformed record goes to the dead-letter topic instead of killing them.

``usage.events`` itself is consumed by the batch consumer in
``streams/usage.py`` (aiokafka, not a Faust agent) and is created by
``metering topics ensure`` / the worker's start-up.
"""

from __future__ import annotations

import faust

from metering.settings import Settings


def dead_letter_topic(app: faust.App, settings: Settings) -> faust.types.TopicT:
    return app.topic(
        settings.dlq_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=1,
    )
