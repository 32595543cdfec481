"""metering: API usage metering for edge services and the stream workers."""

from metering.edge.producer import UsageProducer
from metering.events import UsageEvent
from metering.settings import Settings

__all__ = ["Settings", "UsageEvent", "UsageProducer"]
__version__ = "0.1.0"
