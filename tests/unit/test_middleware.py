"""Request-side helpers of the middleware (no services needed)."""

from metering.edge.middleware import MeteringMiddleware


def test_forwarded_for_is_read_from_the_right_behind_trusted_proxies():
    mw = MeteringMiddleware(None, guard=None, trusted_proxies=["10.0.0.0/8"])  # type: ignore[arg-type]

    def ip(peer: str, xff: str | None) -> str:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return mw._client_ip({"client": (peer, 1234), "headers": headers})

    assert ip("10.0.0.5", "203.0.113.9") == "203.0.113.9"
    # a client-supplied first entry is not believed: the proxy appended the real peer
    assert ip("10.0.0.5", "1.2.3.4, 203.0.113.9") == "203.0.113.9"
    assert ip("10.0.0.5", "203.0.113.9, 10.0.0.7") == "203.0.113.9"  # two proxies
    assert ip("198.51.100.1", "203.0.113.9") == "198.51.100.1"  # untrusted peer: ignored
    assert ip("10.0.0.5", "garbage") == "10.0.0.5"
    assert ip("10.0.0.5", None) == "10.0.0.5"
