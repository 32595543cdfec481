"""The edge's answers in the app's OpenAPI schema.

The middleware answers 401, 403, 429 and 503 before the app runs; an API
description that omits them is wrong for every client generator and
contract test. :func:`document_edge_responses` adds them (with their JSON
body and headers) to every operation the middleware covers, and the API-key
security schemes (``X-API-Key`` header, bearer token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from metering.edge.middleware import under

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "missing_scopes": {"type": "array", "items": {"type": "string"}},
    },
}
_RETRY_AFTER = {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 0}}


def _response(description: str, *, retry: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR}},
    }
    if retry:
        body["headers"] = {"Retry-After": _RETRY_AFTER}
    return body


EDGE_RESPONSES = {
    "401": _response("Missing, malformed, unknown, revoked or expired API key"),
    "403": _response("The key may not be used from this address, or lacks a scope"),
    "429": _response("Rate limit, daily quota or a throttle reached", retry=True),
    "503": _response("The key could not be checked now; retry", retry=True),
}


def document_edge_responses(
    app: Any, *, anonymous_paths: Iterable[str] = (), exempt_paths: Iterable[str] = ()
) -> None:
    """Wrap ``app.openapi`` (FastAPI) so the schema lists what the edge answers."""
    exempt = tuple(p.rstrip("/") or "/" for p in exempt_paths)
    anonymous = tuple(p.rstrip("/") or "/" for p in anonymous_paths)
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        cached: dict[str, Any] | None = app.openapi_schema
        if cached:
            return cached
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        for path, operations in schema.get("paths", {}).items():
            if under(path, exempt):
                continue
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for status, response in EDGE_RESPONSES.items():
                    responses.setdefault(status, response)
                if not under(path, anonymous):
                    operation.setdefault("security", [{"apiKey": []}, {"bearer": []}])
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
