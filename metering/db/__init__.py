"""PostgreSQL access: connections, migrations and the usage repository."""

from metering.db.connect import connect, is_connection_error

__all__ = ["connect", "is_connection_error"]
