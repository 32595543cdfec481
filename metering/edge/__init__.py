"""The edge: what a metered API service embeds.

::

    from metering.edge import MeteringEdge, MeteringMiddleware, require_scopes

:class:`MeteringEdge` builds the guard (:mod:`.guard`, one Redis round trip
per request) and the producer (:mod:`.producer`) from settings;
:class:`MeteringMiddleware` (:mod:`.middleware`) runs them around each
request; :func:`require_scopes` and :func:`current_identity` are FastAPI
dependencies. Install with ``pip install metering[edge]``.
"""

from metering.edge.guard import Decision, EdgeGuard
from metering.edge.middleware import MeteringMiddleware, current_identity, require_scopes
from metering.edge.openapi import document_edge_responses
from metering.edge.producer import UsageProducer
from metering.edge.service import MeteringEdge

__all__ = [
    "Decision",
    "EdgeGuard",
    "MeteringEdge",
    "MeteringMiddleware",
    "UsageProducer",
    "current_identity",
    "document_edge_responses",
    "require_scopes",
]
