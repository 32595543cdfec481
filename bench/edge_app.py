"""Apps for the edge benchmark: the same trivial endpoint with and without
the metering middleware (uvicorn --factory bench.edge_app:plain|metered)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from metering.edge import MeteringEdge, MeteringMiddleware
from metering.settings import Settings


def _routes(app: FastAPI) -> FastAPI:
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def plain() -> FastAPI:
    return _routes(FastAPI())


def metered() -> FastAPI:
    edge = MeteringEdge(Settings.from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with edge:
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(MeteringMiddleware, guard=edge.guard, producer=edge.producer)
    return _routes(app)
