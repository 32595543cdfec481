"""Shared fixtures. Integration fixtures need the real stack: ``metering stack up``
(``scripts/test`` runs it). They fail, never skip, when a service is missing."""
