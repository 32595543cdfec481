"""An example FastAPI service metered by the metering middleware.

    uvicorn examples.edge_app:app --port 8000 --no-proxy-headers

``--no-proxy-headers``: uvicorn would otherwise believe X-Forwarded-For from
127.0.0.1 and rewrite the client address before the middleware sees it;
``METERING_TRUSTED_PROXIES`` must be the only setting that decides.

Routes: ``/health`` and ``/metrics`` (not metered), ``/public/status`` (anonymous allowed,
50/day per IP), ``/v1/search`` (any valid key), ``/v1/items/{id}`` (scope
``items:read``), ``POST /v1/items`` and ``POST /v1/batch`` (scope
``items:write``; a batch bills 10 units).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse

from metering import metrics
from metering.accounts import Identity
from metering.edge import (
    MeteringEdge,
    MeteringMiddleware,
    current_identity,
    document_edge_responses,
    require_scopes,
)
from metering.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    edge = MeteringEdge(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with edge:
            yield

    app = FastAPI(title="metered example", lifespan=lifespan)
    anonymous, exempt = ("/public",), ("/health", "/metrics", "/openapi.json", "/docs")
    app.add_middleware(
        MeteringMiddleware,
        guard=edge.guard,
        producer=edge.producer,
        anonymous_paths=anonymous,
        exempt_paths=exempt,
        trusted_proxies=[p for p in settings.trusted_proxies.split(",") if p.strip()],
        rotation_url=settings.rotation_url,  # the Sunset header's Link for a forced rotation
    )
    # the schema says what the edge answers before the app runs (401/403/429/503)
    document_edge_responses(app, anonymous_paths=anonymous, exempt_paths=exempt)
    app.state.edge = edge

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # Edge counters for Prometheus; keep it off the public listener in production.
    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(edge.metrics(), media_type=metrics.CONTENT_TYPE)

    @app.get("/public/status")
    async def public_status() -> dict[str, str]:
        return {"status": "operational"}

    @app.get("/v1/search")
    async def search(
        identity: Annotated[Identity | None, Depends(current_identity)], q: str = ""
    ) -> dict[str, object]:
        return {"query": q, "results": [], "tier": identity.tier if identity else None}

    @app.get("/v1/items/{item_id}", dependencies=[Depends(require_scopes("items:read"))])
    async def get_item(item_id: int) -> dict[str, object]:
        return {"id": item_id, "name": f"item {item_id}"}

    @app.post("/v1/items", status_code=201, dependencies=[Depends(require_scopes("items:write"))])
    async def create_item() -> dict[str, object]:
        return {"id": 1}

    @app.post("/v1/batch", dependencies=[Depends(require_scopes("items:write"))])
    async def batch(request: Request) -> dict[str, object]:
        request.state.metering_units = 10
        return {"accepted": 10}

    return app


app = create_app()
