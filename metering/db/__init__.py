"""PostgreSQL access: connections, migrations and the usage repository."""

from metering.db.connect import connect, is_connection_error, is_row_fault

__all__ = ["connect", "is_connection_error", "is_row_fault"]
