"""ASGI middleware and FastAPI dependencies for edge services.

::

    app = FastAPI(lifespan=...)
    app.add_middleware(MeteringMiddleware, guard=guard, producer=producer,
                       anonymous_paths=("/public",))

    @app.get("/v1/reports", dependencies=[Depends(require_scopes("reports:read"))])
    async def reports(identity: Identity = Depends(current_identity)): ...

Per request: key from ``X-API-Key`` or ``Authorization: Bearer`` (a query
parameter only when ``allow_query_key=True``: query strings end up in
access logs) → :meth:`EdgeGuard.check` (verification, IP allowlist, limits,
quota, in one Redis round trip) → the app → one usage event, emitted without
waiting, for every request including rejected ones. Successful responses
carry ``X-RateLimit-*`` (and ``X-Quota-*``) headers; 429s add ``Retry-After``.
Unknown, malformed, revoked, expired and past-grace keys all get the same
401 body. The key itself is never logged or stored.

Apps can weight a request for billing with ``request.state.metering_units = n``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from metering.accounts.model import Identity
from metering.edge.guard import Decision, EdgeGuard
from metering.edge.producer import UsageProducer
from metering.errors import InvalidEventError
from metering.events import (
    HTTP_METHODS,
    MAX_ENDPOINT_LEN,
    MAX_UNITS,
    UsageEvent,
    is_ip,
    parse_uuid,
)

try:  # FastAPI/Starlette are optional: only the dependencies below need them
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY = "metering"
UNITS_KEY = "metering_units"
REJECTED_KEY = "metering_rejected"  # why a dependency refused the request

_BODIES = {
    401: {"error": "unauthorized", "message": "missing or invalid API key"},
    403: {"error": "forbidden", "message": "this key may not be used from this address"},
    429: {"error": "too_many_requests", "message": "rate limit exceeded"},
    503: {"error": "unavailable", "message": "temporarily unavailable, retry later"},
}
_REASON_BODIES = {
    "quota_exceeded": {"error": "quota_exceeded", "message": "daily quota exhausted"},
    "auth_throttled": {
        "error": "too_many_requests",
        "message": "too many failed authentication attempts from this address",
    },
    "forbidden_throttled": {
        "error": "too_many_requests",
        "message": "too many requests from an address this key may not be used from",
    },
}


class MeteringMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: EdgeGuard,
        producer: UsageProducer | None = None,
        anonymous_paths: Iterable[str] = (),
        exempt_paths: Iterable[str] = (),
        allow_query_key: bool = False,
        query_param: str = "api_key",
        trusted_proxies: Iterable[str] = (),
        rotation_url: str = "/keys/rotate",
    ) -> None:
        self.app = app
        self.rotation_link = f'<{rotation_url}>; rel="sunset"'.encode()
        self.guard = guard
        self.producer = producer
        # whole path segments: "/health" covers "/health" and "/health/live",
        # never "/healthcare"
        self.anonymous_paths = tuple(p.rstrip("/") or "/" for p in anonymous_paths)
        self.exempt_paths = tuple(
            p.rstrip("/") or "/" for p in exempt_paths
        )  # not checked, not metered
        self.allow_query_key = allow_query_key
        self.query_param = query_param
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or under(scope["path"], self.exempt_paths):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_ip = self._client_ip(scope)
        key = self._extract_key(scope)
        if key is None and not under(scope["path"], self.anonymous_paths):
            decision = Decision(401, "missing_key")
            self.guard.stats.rejected["missing_key"] += 1
        else:
            decision = await self.guard.check(key, client_ip)
            if decision.status == 401:
                log.info(
                    "authentication failed from %s (%s)",
                    client_ip,
                    "no key"
                    if key is None
                    else f"key prefix {key[:16]!r}"
                    if key.startswith("mk_")
                    else "malformed key",
                )
        overhead = time.perf_counter() - started  # plus the event's, at the end

        status = 500
        sent = 0
        if decision.status is not None:
            status = decision.status
            body = json.dumps(_REASON_BODIES.get(decision.reason, _BODIES[status])).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            if status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="api"'))
            headers += [(k.lower().encode(), v.encode()) for k, v in decision.headers]
            headers += self._sunset(decision)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            sent = len(body)
        else:
            scope.setdefault("state", {})[STATE_KEY] = decision
            extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers]
            extra += self._sunset(decision)

            async def send_wrapper(message: Message) -> None:
                nonlocal status, sent
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), *extra]
                elif message["type"] == "http.response.body":
                    sent += len(message.get("body", b""))
                await send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                self._emit_and_observe(scope, decision, status, started, client_ip, sent, overhead)
            return
        self._emit_and_observe(scope, decision, status, started, client_ip, sent, overhead)

    def _sunset(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """A key under forced rotation: its deadline (RFC 8594) and where to rotate."""
        identity = decision.identity
        if identity is None or identity.rotate_by is None:
            return []
        deadline = formatdate(identity.rotate_by, usegmt=True).encode()
        return [(b"sunset", deadline), (b"link", self.rotation_link)]

    def _emit_and_observe(
        self,
        scope: Scope,
        decision: Decision,
        status: int,
        started: float,
        client_ip: str,
        sent: int,
        overhead: float,
    ) -> None:
        emitting = time.perf_counter()
        self._emit(scope, decision, status, started, client_ip, sent)
        self.guard.stats.observe_overhead(overhead + time.perf_counter() - emitting)

    def _extract_key(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                return value.decode("latin-1").strip() or None
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        if self.allow_query_key and scope.get("query_string"):
            from urllib.parse import parse_qs

            values = parse_qs(scope["query_string"].decode("latin-1")).get(self.query_param)
            if values:
                return values[0]
        return None

    def _trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in self.trusted)

    def _client_ip(self, scope: Scope) -> str:
        """The peer, or behind trusted proxies the nearest untrusted X-Forwarded-For hop.

        Walks the header from the right (each proxy appends what it saw), so a
        client cannot pick its address by sending its own X-Forwarded-For."""
        client = scope.get("client")
        peer = client[0] if client else "0.0.0.0"
        if not self.trusted or not self._trusted(peer):
            return peer
        hops: list[str] = []
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-for":
                hops += [h.strip() for h in value.decode("latin-1").split(",")]
        for entry in reversed(hops):
            hop = hop_address(entry)
            if hop is None:
                break
            if not self._trusted(hop):
                return hop
        return peer

    def _emit(
        self,
        scope: Scope,
        decision: Decision,
        status: int,
        started: float,
        client_ip: str,
        sent: int,
    ) -> None:
        if self.producer is None:
            return
        identity = decision.identity
        route = scope.get("route")
        endpoint = safe_endpoint(getattr(route, "path", None) or scope.get("path") or "/")
        method = scope.get("method", "GET")
        state = scope.get("state", {})
        if decision.status is not None:
            units, rejected = 0, decision.reason
        else:
            units, rejected = state.get(UNITS_KEY, 1), state.get(REJECTED_KEY)
        # Built directly (every field is ours and already well-typed): the full
        # contract validation is for records arriving from outside.
        event = UsageEvent(
            event_id=uuid.uuid4(),
            occurred_at=datetime.now(UTC),
            user_id=parse_uuid(identity.user_id) if identity else None,
            api_key_id=parse_uuid(identity.key_id) if identity else None,
            endpoint=endpoint,
            method=method if method in HTTP_METHODS else "GET",
            status_code=status if 100 <= status <= 599 else 500,
            response_time_ms=round((time.perf_counter() - started) * 1000, 3),
            client_ip=client_ip if is_ip(client_ip) else "0.0.0.0",
            bytes_out=sent,
            units=units if type(units) is int and 0 <= units <= MAX_UNITS else 1,
            rejected=rejected if isinstance(rejected, str) else None,
        )
        try:
            self.producer.emit(event)
        except InvalidEventError as exc:
            log.warning("usage event not emitted: %s", exc)


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Is ``path`` one of ``prefixes`` or below one, segment by segment?"""
    for p in prefixes:
        if p == "/" or path == p or path.startswith(p + "/"):
            return True
    return False


def hop_address(entry: str) -> str | None:
    """The address in one X-Forwarded-For entry: ``ip``, ``ip:port``,
    ``[v6]`` or ``[v6]:port``; None when it is none of those."""
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        entry = host
    elif entry.count(":") == 1:  # IPv4 with a port (a bare IPv6 has several colons)
        host, _, port = entry.partition(":")
        if not port.isdigit():
            return None
        entry = host
    return entry if is_ip(entry) else None


_UNSAFE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def safe_endpoint(path: str) -> str:
    """A path any client sent, as a valid event's endpoint: control characters
    (NUL included) percent-encoded, lone surrogates replaced, at most
    MAX_ENDPOINT_LEN characters; never empty."""
    if _UNSAFE.search(path):
        path = _UNSAFE.sub(lambda m: f"%{ord(m[0]):02X}" if ord(m[0]) < 0x80 else "\ufffd", path)
    return path[:MAX_ENDPOINT_LEN] or "/"


# -- FastAPI dependencies -------------------------------------------------------


def _decision(request: Request) -> Decision | None:
    return request.scope.get("state", {}).get(STATE_KEY)


def current_identity(request: Request) -> Identity | None:
    """The verified identity of the caller (None for anonymous requests)."""
    decision = _decision(request)
    return decision.identity if decision else None


def require_scopes(*scopes: str) -> Callable[[Request], Identity]:
    """A FastAPI dependency: 403 naming the missing scopes; 401 if anonymous."""
    from fastapi import HTTPException

    needed = frozenset(scopes)

    def dependency(request: Request) -> Identity:
        identity = current_identity(request)
        if identity is None:
            setattr(request.state, UNITS_KEY, 0)  # refused: recorded, never billed
            setattr(request.state, REJECTED_KEY, "unauthorized")
            raise HTTPException(401, detail=_BODIES[401], headers={"WWW-Authenticate": "Bearer"})
        granted = set(identity.scopes)
        if "*" in granted:
            return identity
        missing = sorted(needed - granted)
        if missing:
            setattr(request.state, UNITS_KEY, 0)  # refused: recorded, never billed
            setattr(request.state, REJECTED_KEY, "missing_scope")
            raise HTTPException(
                403,
                detail={
                    "error": "insufficient_scope",
                    "message": f"this key lacks the scope(s): {', '.join(missing)}",
                    "missing_scopes": missing,
                },
            )
        return identity

    return dependency
