"""Exceptions raised by the metering library.

Hierarchy::

    MeteringError
    ├── ConfigurationError        bad METERING_* setting (not retriable)
    ├── InvalidEventError         an event breaks the v1 contract (not retriable);
    │                             carries a short machine-readable ``reason``
    ├── InputError                a request an operator made cannot be done as asked
    │                             (unknown user, malformed CIDR, past expiry ...)
    ├── MigrationError            a migration failed or was edited after it landed
    ├── StackError                the local stack could not be brought up
    └── ServiceUnavailable        Kafka / PostgreSQL / Redis unreachable (retriable)

Lower-level errors (asyncpg, redis-py, aiokafka) are translated at the module
that talks to the service, with ``raise ... from exc``. ``retriable`` tells a
caller whether trying again later can succeed.
"""

from __future__ import annotations


class MeteringError(Exception):
    retriable: bool = False


class ConfigurationError(MeteringError):
    pass


class InvalidEventError(MeteringError):
    """The record is not a valid v1 usage event.

    ``reason`` is a stable short code (``missing_field``, ``bad_type`` ...)
    used in DLQ headers and metrics; ``str(exc)`` is the human sentence.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class InputError(MeteringError):
    pass


class MigrationError(MeteringError):
    pass


class StackError(MeteringError):
    pass


class ServiceUnavailable(MeteringError):
    retriable = True
