"""The schema migrations, ``NNNN_name.sql``, applied in order by ``metering db migrate``.

Installed as the package ``metering.migrations`` (see ``pyproject.toml``) so
that a wheel carries them; this folder stays their one source.
"""
