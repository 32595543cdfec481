"""PostgreSQL access: connections, migrations and the usage repository."""

from metering.db.connect import RowDataError, connect, is_connection_error, is_row_fault

__all__ = ["RowDataError", "connect", "is_connection_error", "is_row_fault"]
